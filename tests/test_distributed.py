"""Converted models under DDP and FSDP2 (``fully_shard``): 2 CPU processes, gloo backend."""

import os
import socket
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _adapter_fixtures import METHODS

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(rank, port):
    sys.path.insert(0, TESTS_DIR)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _build(method, seed=0):
    from _adapter_fixtures import converted_tiny_lm

    return converted_tiny_lm(method, seed)  # same seed, so the same base weights on every rank


def _fresh_base():
    from _adapter_fixtures import TinyLM

    torch.manual_seed(0)
    return TinyLM(vocab=32, dim=16)


def _data(rank):
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of the data
    return torch.randint(0, 32, (4, 12), generator=g)


def _gather(t):
    out = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(out, t.contiguous())
    return out


def _train(model, params, ids):
    opt = torch.optim.SGD(params, lr=0.5)
    losses = []
    for _ in range(STEPS):
        loss = model.loss(ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _ddp_worker(rank, port, method, out_dir):
    _setup(rank, port)
    try:
        import slimtune
        from slimtune import convert

        model = _build(method)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ids = _data(rank)

        def loss_fn(x):
            logits = ddp(x[:, :-1])
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))

        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.5)
        losses = []
        for _ in range(STEPS):
            loss = loss_fn(ids)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0], losses
        # ranks agree on every adapter tensor (values, and for sparse deltas the index buffers)
        for name, m in convert.converted_modules(model).items():
            for k, t in convert.adapter_state(m).items():
                a, b = _gather(t.detach())
                assert torch.equal(a, b), f"{name}.{k} differs between ranks"
        for n, p in model.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), n
        slimtune.save(ddp, out_dir)  # rank 0 writes
        dist.barrier()
        fresh = _fresh_base()
        slimtune.load(fresh, out_dir)
        torch.testing.assert_close(fresh(ids), model(ids))
    finally:
        dist.destroy_process_group()


def _fsdp_worker(rank, port, method, out_dir):
    _setup(rank, port)
    try:
        from torch.distributed.fsdp import fully_shard

        import slimtune
        from slimtune import convert

        model = _build(method)
        reference = _build(method)  # unsharded copy trained on the concatenated data: the oracle
        for layer in convert.converted_modules(model).values():  # one FSDP unit per converted layer
            fully_shard(layer)
        fully_shard(model)
        ids = _data(rank)
        losses = _train(model, [p for p in model.parameters() if p.requires_grad], ids)
        losses = [loss.item() for loss in losses]
        assert losses[-1] < losses[0], losses
        # FSDP averages gradients over ranks: the same as one process on both ranks' batches
        all_ids = torch.cat(_gather(ids))
        opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
        for _ in range(STEPS):
            per_rank = torch.stack([reference.loss(all_ids[r * 4 : (r + 1) * 4]) for r in range(WORLD)]).mean()
            opt.zero_grad()
            per_rank.backward()
            opt.step()
        for name, m in convert.converted_modules(model).items():
            ref = reference.get_submodule(name)
            for k, t in convert.adapter_state(m).items():
                full = t.full_tensor() if hasattr(t, "full_tensor") else t
                torch.testing.assert_close(
                    full.detach(), convert.adapter_state(ref)[k].detach(), atol=1e-5, rtol=1e-4, msg=f"{name}.{k}"
                )
        slimtune.save(model, out_dir)  # gathers the shards; rank 0 writes
        dist.barrier()
        fresh = _fresh_base()
        slimtune.load(fresh, out_dir)
        torch.testing.assert_close(fresh(ids), reference(ids), atol=1e-5, rtol=1e-4)
    finally:
        dist.destroy_process_group()


def _spawn(worker, method):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(_free_port(), method, d), nprocs=WORLD, join=True)


@pytest.mark.parametrize("method", METHODS)
def test_ddp_two_processes(method):
    _spawn(_ddp_worker, method)


@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_two_processes(method):
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("torch.distributed.fsdp.fully_shard is not available")
    _spawn(_fsdp_worker, method)
