"""Reading checkpoints lazily and writing output folders atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .reference import ConversionError

_LAYOUTS = (  # (index file, single file, format), in order of preference
    ("model.safetensors.index.json", "model.safetensors", "safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", "torch"),
)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class _SafetensorsFile:
    """Reads single tensors of a safetensors file with plain file reads. Unlike a memory map, whose touched pages
    count as resident until the file is closed, each tensor's memory is freed as soon as it is dropped, so
    converting a checkpoint needs about one model of memory, not two."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as file:
            header_size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(header_size))
        header.pop("__metadata__", None)
        self.start = 8 + header_size
        self.entries = header

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def get_tensor(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise ConversionError(f"{self.path.name}: {key} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        with open(self.path, "rb") as file:
            file.seek(self.start + begin)
            data = bytearray(file.read(end - begin))
        tensor = torch.frombuffer(data, dtype=_SAFETENSORS_DTYPES[entry["dtype"]]) if data else torch.empty(0)
        return tensor.reshape(entry["shape"])


class CheckpointReader:
    """Tensor-by-tensor access to the weights in a folder (`model.safetensors`, `pytorch_model.bin`, or their sharded
    forms with an index). Safetensors are read tensor by tensor; PyTorch files are loaded with `weights_only=True`
    (never unpickling arbitrary objects) and memory-mapped."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.format, files = self._locate()
        self._file_of: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._open: dict[Path, object] = {}
        for file in files:
            handle = self._handle(file)
            for key in handle.keys():
                if key in self._file_of:
                    raise ConversionError(f"{key} appears in both {self._file_of[key].name} and {file.name}")
                self._file_of[key] = file
                self._shapes[key] = self._shape(handle, key)

    def _locate(self) -> tuple[str, list[Path]]:
        for index_name, single_name, fmt in _LAYOUTS:
            index = self.folder / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text()).get("weight_map")
                if not weight_map:
                    raise ConversionError(f"{index} has no weight_map")
                files = sorted({self.folder / name for name in weight_map.values()})
                absent = [f.name for f in files if not f.is_file()]
                if absent:
                    raise ConversionError(f"{index} lists shards that do not exist: {absent}")
                return fmt, files
            if (self.folder / single_name).is_file():
                return fmt, [self.folder / single_name]
        present = sorted(p.name for p in self.folder.iterdir()) if self.folder.is_dir() else "no such folder"
        raise ConversionError(
            f"No weights in {self.folder}: expected model.safetensors[.index.json] or pytorch_model.bin[.index.json]; "
            f"found {present}"
        )

    def _handle(self, file: Path):
        if file not in self._open:
            if self.format == "safetensors":
                try:
                    self._open[file] = _SafetensorsFile(file)
                except (OSError, ValueError) as error:
                    raise ConversionError(f"Cannot read {file}: {error}") from error
            else:
                try:
                    self._open[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                except Exception as error:  # a pickle with code in it, or a corrupt file
                    raise ConversionError(f"Cannot load {file} with weights_only=True: {error}") from error
        return self._open[file]

    def _shape(self, handle, key: str) -> tuple[int, ...]:
        return handle.shape(key) if self.format == "safetensors" else tuple(handle[key].shape)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def read(self, key: str) -> torch.Tensor:
        handle = self._handle(self._file_of[key])
        return handle.get_tensor(key) if self.format == "safetensors" else handle[key]
