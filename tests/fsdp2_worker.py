"""One process of `test_fsdp2.py`: a tiny implicit model sharded with torch's FSDP2 (every block, then the root) over
gloo, trained on this rank's half of each batch; `--save DIR` writes a distributed checkpoint (model and optimizer)
after the last step, `--resume DIR` starts from one. Rank 0 writes the full weights and the warnings to `--out`."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_llama, tiny_mamba2  # noqa: E402

FAMILIES = {"mamba2": tiny_mamba2, "llama": tiny_llama}


def batches(steps: int, start: int = 0):
    for step in range(start, start + steps):
        yield torch.randint(3, 64, (4, 8), generator=torch.Generator().manual_seed(step))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--first-step", type=int, default=0)
    parser.add_argument("--save")
    parser.add_argument("--resume")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = FAMILIES[args.family](max_iterations=6).train()
    for block in model.base_model.layers:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if args.resume:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=args.resume)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for tokens in batches(args.steps, args.first_step):
            rows = tokens.chunk(world)[rank]
            model(rows, labels=rows).loss.backward()  # FSDP2 averages the gradients over the ranks
            optimizer.step()
            optimizer.zero_grad()
    if args.save:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=args.save)
    full = {name: tensor.full_tensor() for name, tensor in model.state_dict().items()}
    if rank == 0:
        torch.save(full, args.out)
        Path(args.out + ".json").write_text(json.dumps(sorted({str(w.message) for w in caught})))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
