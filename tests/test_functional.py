"""slimtune.functional: every torch.ops.slimtune.* op is reached through a functional form there
(a backward op through the forward whose autograd calls it), and each form matches its reference."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import slimtune
from slimtune import functional as SF
from slimtune import reference


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("slimtune::"):
            self.ops.add(name.split("::")[1].split(".")[0])
        return func(*args, **(kwargs or {}))


def _sparse_inputs(g):
    x = torch.randn(6, 16, generator=g, requires_grad=True)
    w = torch.randn(12, 16, generator=g)
    idx = torch.randperm(w.numel(), generator=g)[:20].sort().values.int()
    vals = torch.randn(20, generator=g, requires_grad=True)
    return x, w, idx, slimtune.sparse.rowptr_for(idx, w.shape), vals


def _run_sparse_delta_linear(g):
    x, w, idx, rp, vals = _sparse_inputs(g)
    return SF.sparse_delta_linear(x, w, None, idx, rp, vals)


def _run_sparse_delta_sddmm(g):
    x, w, idx, rp, _ = _sparse_inputs(g)
    return SF.sparse_delta_sddmm(torch.randn(6, 12, generator=g), x.detach(), idx, rp)


def _run_sparse_delta_merge_(g):
    _, w, idx, _, vals = _sparse_inputs(g)
    return SF.sparse_delta_merge_(w, idx, vals.detach(), 0.5)


def _lora_inputs(g):
    x = torch.randn(5, 16, generator=g, requires_grad=True)
    A = torch.randn(4, 16, generator=g, requires_grad=True)
    B = torch.randn(8, 4, generator=g, requires_grad=True)
    return x, torch.randn(8, 16, generator=g), A, B


def _run_lora_linear(g):
    x, w, A, B = _lora_inputs(g)
    return SF.lora_linear(x, w, None, A, B, 2.0, 0.25, seed=3)


def _run_lora_linear_multi(g):
    x, w, A, B = _lora_inputs(g)
    return sum(o.sum() for o in SF.lora_linear_multi(x, [w, w], [None, None], [A, A], [B, B], [1.0, 2.0], 0.25, seed=3))


def _run_lora_dropout_mask(g):
    return SF.lora_dropout_mask(torch.randn(5, 16, generator=g), 0.25, 3)


def _run_memsave_relu(g):
    x = torch.randn(5, 16, generator=g, requires_grad=True)
    return SF.memsave_relu(x).sum() + SF.memsave_relu(x * 1, inplace=True).sum()  # in place: the mask op alone


def _run_memsave_max_pool(g):
    # Off the CPU the pool is ATen's, its indices compacted by memsave_maxpool_compact: the meta
    # device takes that path.
    SF.memsave_max_pool(torch.empty(2, 3, 8, 8, device="meta", requires_grad=True), 2).sum().backward()
    return SF.memsave_max_pool(torch.randn(2, 3, 8, 8, generator=g, requires_grad=True), 2)


def _run_memsave_dropout(g):
    return SF.memsave_dropout(torch.randn(5, 16, generator=g, requires_grad=True), 0.25, seed=3)


RUNS = {name[len("_run_") :]: fn for name, fn in globals().items() if name.startswith("_run_")}


def test_every_op_has_a_functional_form():
    ops = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("slimtune::")}
    assert ops, "no slimtune ops registered"
    assert sorted(RUNS) == sorted(slimtune.functional.__all__)
    reached = set()
    for name, run in RUNS.items():
        mode = _RecordOps()
        with mode:
            out = run(torch.Generator().manual_seed(0))
            if out.requires_grad:
                out.sum().backward()
        reached |= mode.ops
    assert ops <= reached, f"ops without a functional form: {sorted(ops - reached)}"


def test_forms_are_re_exported_from_their_homes():
    assert SF.sparse_delta_linear is slimtune.sparse.sparse_delta_linear
    assert SF.sparse_delta_merge_ is slimtune.sparse.sparse_delta_merge_
    assert SF.lora_linear is slimtune.lora.lora_linear
    assert SF.memsave_relu is slimtune.memsave.memsave_relu


def test_memsave_forms_match_torch_and_save_less():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 9, 9, generator=g, requires_grad=True)
    for nd, xx, kernel in ((2, x, 2), (1, x[0], 3), (3, x.unsqueeze(2).expand(4, 3, 2, 9, 9), (2, 3, 3))):
        got = SF.memsave_max_pool(xx, kernel, stride=2, padding=1, nd=nd)
        want = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1](xx, kernel, 2, 1)
        assert torch.equal(got, want)
        gg = torch.randn(want.shape, generator=g)
        assert torch.equal(torch.autograd.grad(got, x, gg)[0], torch.autograd.grad(want, x, gg)[0])
    assert slimtune.saved_bytes(lambda: SF.memsave_max_pool(x, 2)) < slimtune.saved_bytes(lambda: F.max_pool2d(x, 2))
    y = SF.memsave_relu(x)
    assert torch.equal(y, torch.relu(x))
    assert torch.equal(torch.autograd.grad(y, x, y)[0], torch.autograd.grad(torch.relu(x), x, y)[0])
    d = SF.memsave_dropout(x, 0.5, seed=7)
    keep = d != 0
    assert torch.equal(d, torch.where(keep, x * 2, torch.zeros(())))
    assert torch.equal(torch.autograd.grad(d, x, torch.ones_like(d))[0], keep.float() * 2)
    assert slimtune.saved_bytes(lambda: SF.memsave_dropout(x, 0.5)) == 8  # its int64 seed
    assert torch.equal(SF.memsave_dropout(x, 0.5, training=False), x)


def test_memsave_max_pool_bad_arguments():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="'x'"):
        SF.memsave_max_pool(x[0], 2)
    with pytest.raises(ValueError, match="'stride'"):
        SF.memsave_max_pool(x, 2, stride=(1, 1, 1))
    with pytest.raises(ValueError, match="'nd'"):
        SF.memsave_max_pool(x, 2, nd=4)
    with pytest.raises(ValueError, match="'p'"):
        SF.memsave_dropout(x, 1.5)


def test_sparse_delta_merge_matches_reference():
    g = torch.Generator().manual_seed(2)
    _, w, idx, _, vals = _sparse_inputs(g)
    want = reference.sparse_delta_merge(w, idx, vals.detach(), 0.5)
    assert torch.equal(SF.sparse_delta_merge_(w, idx, vals.detach(), 0.5), want)
