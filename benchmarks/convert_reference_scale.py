"""Time and peak memory of converting a full-size reference checkpoint (random-init weights in the reference layout).

    implicit-lm benchmark convert-reference-scale --preset mamba2-1.3b-implicit [--workdir DIR]

Writes the reference-layout checkpoint with a helper (not timed), then runs the conversion CLI in a fresh process
and reports its wall time and peak memory against the target of about 1.5x the checkpoint size. Memory is the
resident set of the whole process tree (the conversion and its verification reload), sampled every 20 ms and
summed over the processes alive at each sample; each process's own high-water mark (VmHWM, exact) is reported
beside it. (`ru_maxrss` of the children would not do: a forked child inherits the high-water mark of this process,
which writing the source checkpoint raises to about 2x.)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from implicit_lm.conversion.presets import preset_reference_config
from implicit_lm.conversion.reference import write_reference_checkpoint

TARGET_RATIO = 1.5
SAMPLE_SECONDS = 0.02


def _high_water_mark(pid: int) -> int:
    """Peak resident bytes of a process since its last exec (Linux `VmHWM`)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise ProcessLookupError(pid)


class TreeMemorySampler(threading.Thread):
    """Samples the resident memory of a process and its descendants until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.peak_total = 0
        self.peak_by_process: dict[str, int] = {}
        self._stop_event = threading.Event()

    def _label(self, process: psutil.Process) -> str:
        return "conversion" if process.pid == self.root.pid else f"child {process.pid} ({process.name()})"

    def run(self) -> None:
        while not self._stop_event.is_set():
            total = 0
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for process in processes:
                try:
                    rss = process.memory_info().rss
                    high_water = _high_water_mark(process.pid)
                    label = self._label(process)
                except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
                    continue
                total += rss
                self.peak_by_process[label] = max(self.peak_by_process.get(label, 0), high_water)
            self.peak_total = max(self.peak_total, total)
            time.sleep(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="implicit-lm benchmark convert-reference-scale", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", default="mamba2-1.3b-implicit")
    parser.add_argument("--workdir", type=Path, help="where to write the checkpoints (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        source, destination = Path(workdir) / "src", Path(workdir) / "dst"
        write_reference_checkpoint(preset_reference_config(args.preset), source, shards=4)
        checkpoint_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        command = [sys.executable, "-m", "implicit_lm.conversion.convert_reference", "--src", str(source),
                   "--dst", str(destination)]
        start = time.perf_counter()
        process = subprocess.Popen(command)
        sampler = TreeMemorySampler(process.pid)
        sampler.start()
        returncode = process.wait()
        sampler.stop()
        elapsed = time.perf_counter() - start
        if returncode != 0:
            raise SystemExit(f"conversion failed with exit status {returncode}")
        written = sum(p.stat().st_size for p in destination.glob("*.safetensors"))
    ratio = sampler.peak_total / checkpoint_bytes
    print(f"preset {args.preset}: checkpoint {checkpoint_bytes / 1e9:.2f} GB, written {written / 1e9:.2f} GB")
    print(f"conversion wall time {elapsed:.1f} s")
    for label, peak in sampler.peak_by_process.items():
        print(f"  high-water RSS {label}: {peak / 1e9:.2f} GB = {peak / checkpoint_bytes:.2f}x")
    print(f"peak RSS of the process tree {sampler.peak_total / 1e9:.2f} GB = {ratio:.2f}x the checkpoint "
          f"(target <= {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'NOT met'})")


if __name__ == "__main__":
    main()
