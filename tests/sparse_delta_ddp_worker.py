"""Worker of the 2-process gloo test: each rank sees different data, then the ranks compare indices."""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def main(rank: int, world: int, port: str, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = port
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import slimtune
    from slimtune.nn import SparseDeltaLinear

    torch.manual_seed(0)  # same model on every rank
    model = nn.Sequential(
        SparseDeltaLinear(nn.Linear(32, 40), density=0.05), nn.ReLU(), SparseDeltaLinear(nn.Linear(40, 8), density=0.1)
    )
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = slimtune.SparseDeltaScheduler(model, opt, every=4, accumulate_steps=2, drop_fraction=0.5, total_steps=100)
    before = [m.indices.clone() for m in model.modules() if isinstance(m, SparseDeltaLinear)]
    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(4):
        x = torch.randn(16, 32, generator=gen)
        loss = F.mse_loss(ddp(x), torch.randn(16, 8, generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    assert sched.updates == 1
    layers = [m for m in model.modules() if isinstance(m, SparseDeltaLinear)]
    torch.save(
        {"indices": [m.indices for m in layers], "before": before, "values": [m.values.detach() for m in layers]},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.barrier()  # both ranks done before either tears gloo down (an early exit aborts the peer)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
