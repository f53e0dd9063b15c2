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
        loss = (y ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def test_update_prunes_smallest_and_regrows_best_candidates():
    m = one_layer()
    opt = torch.optim.AdamW([m.values], lr=1e-3)
    sched = slimtune.SparseDeltaScheduler(m, opt, every=4, accumulate_steps=2, drop_fraction=0.25, total_steps=1000)
    xs = [torch.randn(8, 20) for _ in range(4)]
    captured = []
    train_steps(m, opt, sched, 3, xs)  # steps 1..3: the pool is armed after step 2
    pool = m._score_pool
    assert pool is not None and sched.step_count == 3
    pool_idx = pool["indices"].long().clone()
    assert not bool(torch.isin(pool_idx, m.indices.long()).any())
    old_idx, old_vals = m.indices.long().clone(), m.values.detach().clone()
    # Step 4: its gradient is scored too, then the update runs.
    vals_before_step = None

    def grab(g, x=xs[3]):
        captured.append((g.detach().clone(), x))

    y = m(xs[3])
    y.register_hook(grab)
    loss = (y ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    vals_before_step = m.values.detach().clone()
    expected_scores = pool["scores"].clone()
    sched.step()
    n = int(sched.fraction(4) * 40)
    assert sched.updates == 1 and n == 9
    new_idx = m.indices.long()
    assert new_idx.numel() == 40 and bool((new_idx[1:] > new_idx[:-1]).all())
    dropped = old_idx[~torch.isin(old_idx, new_idx)]
    assert torch.equal(dropped.sort().values, old_idx[vals_before_step.abs().argsort()[:n]].sort().values)
    grown = new_idx[~torch.isin(new_idx, old_idx)]
    assert torch.equal(grown.sort().values, pool_idx[expected_scores.topk(n).indices].sort().values)
    # The pool scores are the accumulated |dense gradient| at the pool positions (steps 3 and 4).
    g4, x4 = captured[0]
    dense = reference.sparse_delta_sddmm(g4, x4, pool_idx).abs()
    assert bool((expected_scores >= dense - 1e-6).all())
    # Regrown entries start at zero with zero Adam moments; kept ones keep value and moments.
    fresh = torch.isin(new_idx, grown)
    st = opt.state[m.values]
    assert bool((m.values[fresh] == 0).all())
    assert bool((st["exp_avg"][fresh] == 0).all()) and bool((st["exp_avg_sq"][fresh] == 0).all())
    kept_new = new_idx[~fresh]
    kept_old_pos = torch.searchsorted(old_idx, kept_new)
    assert torch.equal(m.values.detach()[~fresh], vals_before_step[kept_old_pos])
    assert bool((st["exp_avg_sq"][~fresh] > 0).all())
    assert torch.equal(m.rowptr, slimtune.sparse.rowptr_for(m.indices, m.base.weight.shape))
    assert m._score_pool is None


def test_accumulated_scores_equal_the_dense_gradient_at_the_pool():
    m = one_layer()
    opt = torch.optim.SGD([m.values], lr=0.0)
    sched = slimtune.SparseDeltaScheduler(m, opt, every=5, accumulate_steps=3, score="fisher", total_steps=100)
    xs = [torch.randn(6, 20) for _ in range(4)]
    captured = []
    train_steps(m, opt, sched, 2, xs)
    pool_idx = m._score_pool["indices"]
    train_steps(m, opt, sched, 2, xs[2:], capture=captured)
    expected = sum(reference.sparse_delta_sddmm(g, x, pool_idx).square() for g, x in captured)
    torch.testing.assert_close(m._score_pool["scores"], expected.float(), atol=1e-6, rtol=1e-5)


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
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), "2", port, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    outs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for a, b, before in zip(r0["indices"], r1["indices"], r0["before"]):
        assert not torch.equal(a, before), "no index update happened"
        assert torch.equal(a, b)
    for a, b in zip(r0["values"], r1["values"]):
        assert torch.equal(a, b)
