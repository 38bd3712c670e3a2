"""Reading checkpoints lazily, tensor by tensor; every read error names the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .reference import ConversionError

_LAYOUTS = (  # (index file, single file, format), in order of preference
    ("model.safetensors.index.json", "model.safetensors", "safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", "torch"),
)


def read_json(path: Path) -> dict:
    """A JSON object from `path`; `ConversionError` naming the file if it is not one."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(value, dict):
        raise ConversionError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


class _SafetensorsFile:
    """Reads single tensors of a safetensors file through the safetensors library, which validates the header, its
    size and every tensor's offsets and bounds. The file is opened anew for each tensor: a memory map held open keeps
    every touched page resident, so converting a checkpoint would need two models of memory instead of one."""

    def __init__(self, path: Path):
        self.path = path
        with self._open() as handle:
            self.entries = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}

    def _open(self):
        try:
            return safe_open(str(self.path), framework="pt")
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"{self.path} is not a valid safetensors file: {error}") from error

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key]

    def get_tensor(self, key: str) -> torch.Tensor:
        with self._open() as handle:
            try:
                return handle.get_tensor(key)
            except (SafetensorError, TypeError, ValueError) as error:  # e.g. a dtype torch does not have
                raise ConversionError(f"{self.path}: cannot read {key}: {error}") from error


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
                weight_map = read_json(index).get("weight_map")
                if not weight_map or not isinstance(weight_map, dict):
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
                self._open[file] = _SafetensorsFile(file)
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
        """The tensor `key`; `ConversionError` naming the file and the key if it is not finite (a NaN or inf in a
        source weight would only surface later as a diverging solve)."""
        file = self._file_of[key]
        handle = self._handle(file)
        tensor = handle.get_tensor(key) if self.format == "safetensors" else handle[key]
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            count = int((~torch.isfinite(tensor)).sum())
            raise ConversionError(f"{file}: {key} holds {count} NaN or infinite value(s) of {tensor.numel()}")
        return tensor
