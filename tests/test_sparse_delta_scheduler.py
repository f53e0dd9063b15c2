import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import slimtune
from slimtune import reference
from slimtune.nn import SparseDeltaLinear


def one_layer(k=40, din=20, dout=16, seed=0):
    torch.manual_seed(seed)
    m = SparseDeltaLinear(nn.Linear(din, dout), k=k)
    with torch.no_grad():
        m.values.normal_()
    return m


def train_steps(m, opt, sched, n, xs, capture=None):
    for i in range(n):
        x = xs[i]
        y = m(x)
        if capture is not None:
            y.register_hook(lambda g, x=x: capture.append((g.detach().clone(), x)))
        loss = (y**2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def dense_grad(g, x):
    return g.reshape(-1, g.shape[-1]).double().t() @ x.reshape(-1, x.shape[-1]).double()


def test_update_drops_smallest_and_regrows_the_best_of_all_inactive_entries():
    m = one_layer()
    opt = torch.optim.AdamW([m.values], lr=1e-3)
    sched = slimtune.SparseDeltaScheduler(m, opt, every=4, accumulate_steps=2, drop_fraction=0.25, total_steps=1000)
    xs = [torch.randn(8, 20) for _ in range(4)]
    captured = []
    m.register_grad_observer(lambda mod, g, x: captured.append((g.clone(), x.clone())))
    train_steps(m, opt, sched, 3, xs)  # steps 1..3: the accumulators are armed after step 2
    assert sched.accumulators is not None and sched.step_count == 3
    old_idx = m.indices.long().clone()
    y = m(xs[3])
    loss = (y**2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    vals_before_update = m.values.detach().clone()
    sched.step()
    n = int(sched.fraction(4) * 40)
    assert sched.updates == 1 and n == 9 and sched.accumulators is None
    new_idx = m.indices.long()
    assert new_idx.numel() == 40 and bool((new_idx[1:] > new_idx[:-1]).all())
    # The same choice as SpIEL's rule on the dense gradient summed over the last two steps.
    grad_sum = dense_grad(*captured[2]) + dense_grad(*captured[3])
    expected = reference.spiel_regrow(old_idx, vals_before_update, grad_sum, n)
    assert torch.equal(new_idx, expected)
    grown = new_idx[~torch.isin(new_idx, old_idx)]
    assert grown.numel() == n
    # Regrown entries start at zero; kept ones keep value and moments.
    fresh = torch.isin(new_idx, grown)
    assert bool((m.values[fresh] == 0).all())
    kept_old_pos = torch.searchsorted(old_idx, new_idx[~fresh])
    assert torch.equal(m.values.detach()[~fresh], vals_before_update[kept_old_pos])
    assert torch.equal(m.rowptr, slimtune.sparse.rowptr_for(m.indices, m.base.weight.shape))
    assert len(m._grad_observers) == 1  # the scheduler removed its observer; the test's own is left


def test_accumulated_scores_equal_the_dense_gradient():
    for score in ("gradient", "fisher"):
        m = one_layer()
        opt = torch.optim.SGD([m.values], lr=0.0)
        sched = slimtune.SparseDeltaScheduler(m, opt, every=5, accumulate_steps=3, score=score, total_steps=100)
        xs = [torch.randn(6, 20) for _ in range(4)]
        captured = []
        train_steps(m, opt, sched, 2, xs)
        train_steps(m, opt, sched, 2, xs[2:], capture=captured)
        grads = [dense_grad(g, x) for g, x in captured]
        expected = sum(g.square() for g in grads) if score == "fisher" else sum(grads)
        acc = sched.accumulators[0]
        torch.testing.assert_close(acc.sum.double(), expected, atol=1e-6, rtol=1e-5)
        assert acc.sum.dtype == torch.float32 and acc.sum.shape == m.base.weight.shape


def test_decay_schedules_and_random_regrow():
    m = one_layer(k=50)
    opt = torch.optim.AdamW([m.values], lr=1e-3)
    lin = slimtune.SparseDeltaScheduler(m, opt, every=10, total_steps=100, decay="linear", regrow="random")
    cos = slimtune.SparseDeltaScheduler(m, opt, every=10, total_steps=100, decay="cosine")
    assert abs(lin.fraction(50) - 0.1) < 1e-12 and abs(cos.fraction(50) - 0.1) < 1e-12
    assert abs(cos.fraction(25) - 0.2 * 0.5 * (1 + 2**-0.5)) < 1e-12 and lin.fraction(100) == 0
    before = m.indices.clone()
    train_steps(m, opt, lin, 10, [torch.randn(4, 20) for _ in range(10)])
    assert lin.updates == 1 and not torch.equal(before, m.indices)
    assert m.indices.unique().numel() == 50


def test_ddp_two_ranks_end_with_identical_indices(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    worker = Path(__file__).with_name("sparse_delta_ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(r), "2", port, str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for a, b, before in zip(r0["indices"], r1["indices"], r0["before"]):
        assert not torch.equal(a, before), "no index update happened"
        assert torch.equal(a, b)
    for a, b in zip(r0["values"], r1["values"]):
        assert torch.equal(a, b)
