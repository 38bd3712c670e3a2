"""Time and peak memory of converting a full-size reference checkpoint (random-init weights in the reference layout).

    python -m benchmarks.convert_reference_scale --preset mamba2-1.3b-implicit [--workdir DIR]

Writes the reference-layout checkpoint with a helper (not timed), then runs the conversion CLI in a fresh process
and reports its wall time, its peak resident memory (ru_maxrss, the verification reload's process included) and the
ratio of that peak to the checkpoint size, against the target of about 1.5x.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conversion.presets import preset_reference_config
from conversion.reference import write_reference_checkpoint

TARGET_RATIO = 1.5


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mamba2-1.3b-implicit")
    parser.add_argument("--workdir", type=Path, help="where to write the checkpoints (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        source, destination = Path(workdir) / "src", Path(workdir) / "dst"
        write_reference_checkpoint(preset_reference_config(args.preset), source, shards=4)
        checkpoint_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        command = [sys.executable, "-m", "conversion.convert_reference", "--src", str(source), "--dst", str(destination)]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        elapsed = time.perf_counter() - start
        peak_bytes = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        written = sum(p.stat().st_size for p in destination.glob("*.safetensors"))
    ratio = peak_bytes / checkpoint_bytes
    print(f"preset {args.preset}: checkpoint {checkpoint_bytes / 1e9:.2f} GB, written {written / 1e9:.2f} GB")
    print(f"conversion wall time {elapsed:.1f} s")
    print(f"peak RSS of the conversion processes {peak_bytes / 1e9:.2f} GB = {ratio:.2f}x the checkpoint "
          f"(target <= {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'NOT met'})")


if __name__ == "__main__":
    main()
