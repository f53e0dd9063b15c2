"""The host SIMT emulator itself: reductions that need their barriers and warp exchanges pass under
every schedule, a reduction missing a barrier fails under the adversarial ones, bad launches fail."""

import os
import subprocess
import sys

import pytest
import torch

from . import build
from .conftest import SCHEDULES

pytestmark = pytest.mark.cuda_host

THREADS = 256


def run(emu, name, x, out_size, grid=(1, 1, 1), block=(THREADS, 1, 1), smem=0, opt_in=-1):
    return emu._selftest(name, x, out_size, list(grid), list(block), smem, opt_in)


def ints(n):
    # Integer-valued floats: every summation order is exact, so results compare bitwise.
    return torch.randint(-50, 50, (n,)).float()


@pytest.mark.parametrize("kernel,smem", [("tree_static", 0), ("tree_dynamic", THREADS * 4), ("warp_reduce", 0)])
def test_block_reductions_pass_under_every_schedule(emu, schedule, kernel, smem):
    x = ints(1000)
    blocks = 4
    out, err = run(emu, kernel, x, blocks, grid=(blocks, 1, 1), smem=smem)
    assert err == ""
    expected = torch.nn.functional.pad(x, (0, blocks * THREADS - x.numel())).view(blocks, THREADS).sum(1)
    assert torch.equal(out, expected)


def test_missing_barrier_fails_under_adversarial_schedules(emu):
    x = ints(1000)
    expected = torch.nn.functional.pad(x, (0, 4 * THREADS - x.numel())).view(4, THREADS).sum(1)
    wrong = []
    for s in SCHEDULES:
        emu._set_schedule(s)
        out, err = run(emu, "tree_missing_barrier", x, 4, grid=(4, 1, 1), smem=THREADS * 4)
        assert err == ""
        if not torch.equal(out, expected):
            wrong.append(s)
    emu._set_schedule("inorder")
    # Reading a partner's slot before it is stored reads the poison (NaN) of fresh shared memory.
    assert set(wrong) >= {"inorder", "shuffled:1", "shuffled:2", "barrier"}, wrong
    assert "reversed" not in wrong  # descending order happens to store every partner first


def test_warp_operations_match_their_definition(emu, schedule):
    x = torch.randn(64)
    out, err = run(emu, "warp_ops", x, 8 * 64, block=(64, 1, 1))
    assert err == ""
    out = out.view(64, 8)
    lane = torch.arange(64) % 32
    base = torch.arange(64) - lane
    pos = (x > 0).view(2, 32)
    ballot = (pos.long() << torch.arange(32)).sum(1)
    assert torch.equal(out[:, 0].long(), (ballot & 0xFFFF).repeat_interleave(32))
    assert torch.equal(out[:, 1].bool(), pos.any(1).repeat_interleave(32))
    assert torch.equal(out[:, 2].bool(), pos.all(1).repeat_interleave(32))
    assert torch.equal(out[:, 3], x[base + 3])
    assert torch.equal(out[:, 4], x[torch.where(lane >= 1, base + lane - 1, base + lane)])
    assert torch.equal(out[:, 5], x[torch.where(lane + 2 < 32, base + lane + 2, base + lane)])
    assert torch.equal(out[:, 6], x[base + (lane ^ 5)])
    assert torch.equal(out[:, 7], x[base + (lane & ~7) + 1])


def test_atomics(emu, schedule):
    x = ints(3000)
    out, err = run(emu, "atomics", x, 6, grid=(3, 1, 1))
    assert err == ""
    assert out[0] == x.sum() and out[1] == x.sum() and out[4] == x.sum() and out[5] == x.numel()
    bits = out[2:4].view(torch.int32)
    assert bits[0] == x.max().int() and bits[1] == -x.min().int()


@pytest.mark.parametrize(
    "kernel,needle",
    [
        ("divergent_barrier", "deadlock"),
        ("barrier_after_exit", "1 exited"),
        ("divergent_warp", "divergent warp operation"),
    ],
)
def test_divergence_is_reported(emu, schedule, kernel, needle):
    _, err = run(emu, kernel, torch.zeros(64), 64, block=(64, 1, 1))
    assert "unspecified launch failure" in err and needle in err, err


@pytest.mark.parametrize(
    "grid,block,smem,opt_in,needle",
    [
        ((1, 1, 1), (1025, 1, 1), 0, -1, "exceeds (1024, 1024, 64)"),
        ((1, 1, 1), (32, 32, 2), 0, -1, "more than 1024 threads"),
        ((1, 1, 1), (1, 1, 65), 0, -1, "exceeds (1024, 1024, 64)"),
        ((1, 1, 1), (2048, 1, 1), 0, -1, "exceeds (1024, 1024, 64)"),
        ((1, 65536, 1), (32, 1, 1), 0, -1, "exceeds (2^31 - 1, 65535, 65535)"),
        ((1, 1, 65536), (32, 1, 1), 0, -1, "exceeds (2^31 - 1, 65535, 65535)"),
        ((0, 1, 1), (32, 1, 1), 0, -1, "empty grid"),
        ((1, 1, 1), (0, 1, 1), 0, -1, "empty block"),
        ((1, 1, 1), (32, 1, 1), 48 * 1024 + 1, -1, "exceed the kernel's 49152"),
        ((1, 1, 1), (32, 1, 1), 100 * 1024, 64 * 1024, "exceed the kernel's 65536"),
        ((1, 1, 1), (32, 1, 1), 0, 227 * 1024 + 1, "exceed 227 KiB"),
    ],
)
def test_launch_limits(emu, grid, block, smem, opt_in, needle):
    _, err = run(emu, "noop", torch.zeros(1), 1, grid=grid, block=block, smem=smem, opt_in=opt_in)
    assert needle in err, err


@pytest.mark.parametrize(
    "grid,block,smem,opt_in",
    [
        ((1, 65535, 1), (1, 1, 1), 0, -1),
        ((1, 1, 1), (1024, 1, 1), 0, -1),
        ((1, 1, 1), (4, 4, 64), 0, -1),
        ((1, 1, 1), (32, 1, 1), 48 * 1024, -1),
        ((1, 1, 1), (32, 1, 1), 227 * 1024, 227 * 1024),
    ],
)
def test_launch_limits_admit_the_largest_legal_launch(emu, grid, block, smem, opt_in):
    _, err = run(emu, "noop", torch.zeros(1), 1, grid=grid, block=block, smem=smem, opt_in=opt_in)
    assert err == ""


def test_schedule_names_are_checked(emu):
    with pytest.raises(RuntimeError, match="argument 'spec'"):
        emu._set_schedule("backwards")


def test_launch_count(emu):
    before = emu._launch_count()
    run(emu, "noop", torch.zeros(1), 1)
    run(emu, "noop", torch.zeros(1), 1, block=(2048, 1, 1))  # rejected: never launched
    assert emu._launch_count() == before + 1


@pytest.mark.parametrize("spec,poisoned", [("inorder", True), ("reversed", False)])
def test_schedule_from_environment(emu, spec, poisoned):
    code = (
        "import sys, torch, slimtune; torch.ops.load_library(sys.argv[1]); "
        "out, _ = torch.ops.slimtune_emu._selftest('tree_missing_barrier', torch.arange(1000.0), 4, [4, 1, 1], "
        "[256, 1, 1], 1024, -1); print(bool(out.isnan().any()))"
    )
    env = dict(os.environ, SLIMTUNE_EMU_SCHEDULE=spec)
    res = subprocess.run(
        [sys.executable, "-c", code, build.LAST["library"]], env=env, capture_output=True, text=True, check=True
    )
    assert res.stdout.strip() == str(poisoned)


def test_failed_launch_does_not_leak_into_the_next_op(emu):
    _, err = run(emu, "noop", torch.zeros(1), 1, block=(2048, 1, 1))
    assert "exceeds" in err
    w = torch.zeros(4, 4)
    emu.sparse_delta_merge_(w, torch.tensor([1, 5]), torch.ones(2), 1.0)
    assert w.view(-1)[[1, 5]].tolist() == [1.0, 1.0]
