"""LoRA CUDA dropout kernels and glue, emulated on the host, against the reference and the CPU op."""

import pytest
import torch
from slimtune import reference

pytestmark = pytest.mark.cuda_host

CPU = torch.ops.slimtune

# (x dtype, adapter dtype): every pair the ops accept.
PAIRS = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float64, torch.float32),
]


def make(x_shape, d_out, r, dtype, adapter_dtype, bias=True):
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    d_in = x_shape[-1]
    x = rnd(*x_shape).to(dtype)
    w = rnd(d_out, d_in, scale=d_in**-0.5).to(dtype)
    b = rnd(d_out).to(dtype) if bias else None
    A = rnd(r, d_in, scale=d_in**-0.5).to(adapter_dtype)
    B = rnd(d_out, r, scale=r**-0.5).to(adapter_dtype)
    return x, w, b, A, B


def forward_backward(ops, x, w, b, A, B, scale, p, seed, offset, g):
    seed = torch.tensor([seed]) if p > 0 else None  # the op's seed: a one-element int64 tensor
    y, xa = ops.lora_linear(x, w, b, A, B, scale, p, seed, offset)
    grads = ops.lora_linear_backward(g, x, w, A, B, xa, scale, p, seed, offset, True, True, True, b is not None)
    return [y, xa, *grads]


def reference_grads(x, w, b, A, B, scale, p, mask, g):
    """y, dx, dA, dB, dbias of the reference in float64, with the given keep mask."""
    leaf = [t.double().requires_grad_() if t is not None else None for t in (x, A, B, b)]
    xr, Ar, Br, br = leaf
    y = reference.lora_linear(xr, w.double(), br, Ar, Br, scale, mask, p)
    y.backward(g.double())
    return [y, xr.grad, Ar.grad, Br.grad, br.grad if br is not None else None]


def run_case(emu, case, dtype, adapter_dtype, scale, seed):
    """Forward and backward of one case on the emulator and the CPU op, and the float64 reference
    under the CPU op's keep mask; returns the op arguments too, for a rerun."""
    x_shape, d_out, r, p, offset = case
    x, w, b, A, B = make(x_shape, d_out, r, dtype, adapter_dtype)
    g = torch.randn(*x_shape[:-1], d_out, dtype=torch.float64).to(dtype)
    args = (x, w, b, A, B, scale, p, seed, offset, g)
    ours = forward_backward(emu, *args)
    cpu = forward_backward(CPU, *args)
    mask = CPU.lora_dropout_mask(x, p, torch.tensor([seed]), offset) if p > 0 else None
    ref = reference_grads(x, w, b, A, B, scale, p, mask, g)
    return args, ours, cpu, ref


def assert_multi_equals_cpu(emu, x, args, randn):
    """lora_linear_multi and its backward on the emulator against the CPU op; ``args`` are the
    forward's arguments after x, ``randn(shape)`` draws each output's gradient."""
    outs_e, xa_e = emu.lora_linear_multi(x, *args)
    outs_c, xa_c = CPU.lora_linear_multi(x, *args)
    torch.testing.assert_close(xa_e, xa_c, atol=1e-5, rtol=1e-5)
    for o, c in zip(outs_e, outs_c):
        torch.testing.assert_close(o, c, atol=1e-5, rtol=1e-5)
    gs = [randn(o.shape) for o in outs_c]
    ws, bs, As, Bs, scales, p, seed, offset = args
    has_bias = [b.numel() > 0 for b in bs]
    bw = (ws, As, Bs, xa_c, scales, p, seed, offset, True, True, True, has_bias)
    ge = emu.lora_linear_multi_backward(gs, x, *bw)
    gc = CPU.lora_linear_multi_backward(gs, x, *bw)
    torch.testing.assert_close(ge[0], gc[0], atol=1e-5, rtol=1e-5)
    for le, lc in zip(ge[1:], gc[1:]):
        for e, c in zip(le, lc):
            torch.testing.assert_close(e, c, atol=1e-5, rtol=1e-5)


def assert_near(ours, cpu, ref, name):
    """Same result as the CPU op (the GEMMs are the same ATen calls; only the dropout kernels differ)
    and an error against the float64 reference no larger than twice the CPU op's."""
    assert ours.shape == cpu.shape and ours.dtype == cpu.dtype, name
    tight = {torch.float64: 1e-12, torch.float32: 1e-5}.get(ours.dtype, 1e-2)
    torch.testing.assert_close(ours, cpu, atol=tight, rtol=tight, msg=name)
    err = (ours.double() - ref).abs().max().item() if ours.numel() else 0.0
    base = (cpu.double() - ref).abs().max().item() if cpu.numel() else 0.0
    # Plus a few float32 roundings of the largest value: float32 sums in two different orders
    # (the CPU's and the kernel's) differ by that much, whichever happens to be closer.
    fp32_floor = 8 * torch.finfo(torch.float32).eps * ref.abs().max().item() if ref.numel() else 0.0
    if ours.dtype == torch.float64:
        fp32_floor = 0.0
    assert err <= 2 * base + fp32_floor + 1e-12, f"{name}: {err:.3e} vs CPU op {base:.3e}"


# 13 and 21 features: rows that start inside a Philox block of 8 (the scalar path).
CASES = [
    ((6, 13), 7, 3, 0.3, 0),
    ((2, 3, 21), 5, 4, 0.5, 5),
    ((1, 1), 1, 1, 0.25, 1),
    ((0, 9), 4, 2, 0.3, 0),
    ((4, 17), 6, 2, 0.0, 0),
]


@pytest.mark.parametrize("dtype,adapter_dtype", PAIRS)
@pytest.mark.parametrize("case", CASES)
def test_forward_backward(emu, schedule, dtype, adapter_dtype, case):
    _, ours, cpu, ref = run_case(emu, case, dtype, adapter_dtype, 0.7, 11)
    torch.testing.assert_close(ours[1], cpu[1], atol=1e-5, rtol=1e-5, msg="xa")
    for name, o, c, rr in zip(["y", "dx", "dA", "dB", "dbias"], [ours[0]] + ours[2:], [cpu[0]] + cpu[2:], ref):
        assert_near(o, c, rr, name)
        if o.dtype == torch.float64:  # float64 x: formed in float64 whatever the adapters' dtype
            torch.testing.assert_close(o, rr, atol=1e-12, rtol=1e-12, msg=name)


def test_noncontiguous_x(emu, schedule):
    x, w, b, A, B = make((4, 26), 5, 3, torch.float32, torch.float32)
    xs = x[:, ::2]  # strided features: the kernels read x through its strides
    xt = torch.randn(13, 4).t()  # column-major rows
    for xi in (xs, xt):
        g = torch.randn(4, 5)
        ours = forward_backward(emu, xi, w[:, :13], b, A[:, :13], B, 1.5, 0.4, 3, 2, g)
        cpu = forward_backward(CPU, xi, w[:, :13].contiguous(), b, A[:, :13].contiguous(), B, 1.5, 0.4, 3, 2, g)
        for o, c in zip(ours, cpu):
            torch.testing.assert_close(o, c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shape,p,offset", [((5, 13), 0.3, 0), ((3, 7), 0.5, 3), ((1, 1), 0.9, 0), ((0, 4), 0.3, 0), ((37, 45), 0.25, 12)]
)
def test_dropout_mask_equals_cpu(emu, schedule, shape, p, offset):
    like = torch.empty(shape)
    assert torch.equal(
        emu.lora_dropout_mask(like, p, torch.tensor([99]), offset),
        CPU.lora_dropout_mask(like, p, torch.tensor([99]), offset),
    )


@pytest.mark.parametrize("dtype,adapter_dtype", PAIRS)
def test_multi(emu, schedule, dtype, adapter_dtype):
    x, w1, b1, A1, B1 = make((5, 11), 6, 2, dtype, adapter_dtype)
    _, w2, _, A2, B2 = make((5, 11), 3, 4, dtype, adapter_dtype)
    empty = torch.empty(0, dtype=dtype)
    args = ([w1, w2], [b1, empty], [A1, A2], [B1, B2], [0.5, 2.0], 0.3, torch.tensor([7]), 1)
    assert_multi_equals_cpu(emu, x, args, lambda shape: torch.randn(shape, dtype=torch.float64).to(dtype))


# Shapes for the fused CUDA passes: token counts that are no multiple of a block's tokens (split
# sums over tokens), in_features that are a multiple of 8 (16-byte loads, one Philox block per
# 8 features) or not (the scalar path, chunks straddling Philox blocks), more features than one
# stage (split sums over features), r = 1 and r = 64, a 3-D x.
KERNEL_CASES = [
    ((37, 64), 9, 16, 0.3, 0),
    ((19, 100), 6, 1, 0.25, 3),
    ((3, 11, 40), 5, 64, 0.5, 7),
    ((45, 136), 7, 5, 0.1, 2),
    ((21, 24), 4, 3, 0.0, 0),
]
KERNEL_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float64, torch.float64),
]


@pytest.mark.parametrize("dtype,adapter_dtype", KERNEL_PAIRS)
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_fused_passes(emu, schedule, dtype, adapter_dtype, case):
    args, ours, cpu, ref = run_case(emu, case, dtype, adapter_dtype, 1.3, 5)
    tight = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours[1], cpu[1], atol=tight, rtol=tight, msg="xa")
    for name, o, c, rr in zip(["y", "dx", "dA", "dB", "dbias"], [ours[0]] + ours[2:], [cpu[0]] + cpu[2:], ref):
        if o.dtype in (torch.float16, torch.bfloat16):
            assert_near(o, c, rr, name)
        else:  # float32 sums in another order than the CPU's GEMMs: a float32 tolerance
            torch.testing.assert_close(o, c, atol=tight, rtol=tight, msg=name)
            torch.testing.assert_close(o, rr.to(o.dtype), atol=tight, rtol=tight, msg=name)
    # Split sums are reduced in a fixed order: every schedule gives the same bits.
    emu._set_schedule("inorder")
    again = forward_backward(emu, *args)
    for o, a in zip(ours, again):
        assert torch.equal(o, a)


def test_fused_passes_strided_and_misaligned_x(emu, schedule):
    """x read through its strides, and rows whose 16-byte alignment forbids vector loads."""
    big = make((6, 70), 5, 4, torch.bfloat16, torch.float32)[0]
    _, w, b, A, B = make((6, 64), 5, 4, torch.bfloat16, torch.float32)
    g = torch.randn(6, 5).to(torch.bfloat16)
    for xi in (big[:, 1:65], big[:, ::2][:, :32].repeat(1, 2), big.t().contiguous().t()[:, 3:67]):
        ours = forward_backward(emu, xi, w, b, A, B, 0.8, 0.3, 9, 1, g)
        cpu = forward_backward(CPU, xi, w, b, A, B, 0.8, 0.3, 9, 1, g)
        for o, c in zip(ours, cpu):
            torch.testing.assert_close(o, c, atol=1e-2, rtol=1e-2)


def test_multi_wider_than_one_launch(emu, schedule):
    """Stacked ranks past the widest one launch takes (128): the passes run in rank chunks."""
    x, w1, b1, A1, B1 = make((9, 16), 6, 70, torch.float32, torch.float32)
    _, w2, _, A2, B2 = make((9, 16), 3, 80, torch.float32, torch.float32)
    empty = torch.empty(0)
    args = ([w1, w2], [b1, empty], [A1, A2], [B1, B2], [0.5, 2.0], 0.2, torch.tensor([3]), 0)
    assert_multi_equals_cpu(emu, x, args, torch.randn)


def test_seed_is_read_from_the_tensor(emu):
    """The kernels read the seed tensor itself (device memory on a GPU): its value picks the mask."""
    x, w, b, A, B = make((7, 24), 5, 3, torch.float32, torch.float32)
    y5 = emu.lora_linear(x, w, b, A, B, 1.0, 0.4, torch.tensor([5]), 0)[0]
    y6 = emu.lora_linear(x, w, b, A, B, 1.0, 0.4, torch.tensor([6]), 0)[0]
    torch.testing.assert_close(y5, CPU.lora_linear(x, w, b, A, B, 1.0, 0.4, torch.tensor([5]), 0)[0])
    assert not torch.allclose(y5, y6)
