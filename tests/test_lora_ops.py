import pytest
import torch

import slimtune
from slimtune import reference
from slimtune.lora import lora_dropout_mask, lora_linear
from conftest import DEVICES, TOLERANCES, assert_lowp_error_bounded, device_dtype_params
from memsave_helpers import on_both_cpu_paths, saved_tensors

op = torch.ops.slimtune.lora_linear


def make(T, d_in, d_out, r, dtype, device, adapter_dtype=None, bias=True, x_shape=None):
    adapter_dtype = adapter_dtype or dtype
    g = torch.Generator().manual_seed(1234)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    x = rnd(*(x_shape or (T, d_in))).to(device, dtype)
    w = rnd(d_out, d_in, scale=d_in**-0.5).to(device, dtype)
    b = rnd(d_out).to(device, dtype) if bias else None
    A = rnd(r, d_in, scale=d_in**-0.5).to(device, adapter_dtype)
    B = rnd(d_out, r, scale=r**-0.5).to(device, adapter_dtype)
    return x, w, b, A, B


def run_both(x, w, b, A, B, scale, p, seed, grad_x=True, grad_b=True):
    """Output and gradients of the op and of the reference given the op's own mask."""
    mask = lora_dropout_mask(x, p, seed) if p > 0 else None
    outs = []
    for fn in ("op", "ref"):
        xi = x.detach().clone().requires_grad_(grad_x)
        Ai = A.detach().clone().requires_grad_(True)
        Bi = B.detach().clone().requires_grad_(True)
        bi = b.detach().clone().requires_grad_(grad_b) if b is not None else None
        if fn == "op":
            y = lora_linear(xi, w, bi, Ai, Bi, scale, p, seed=seed)
        else:
            y = reference.lora_linear(xi, w, bi, Ai, Bi, scale, mask, p)
        g = torch.Generator().manual_seed(7)
        gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device, y.dtype)
        y.backward(gy)
        outs.append([y.detach(), xi.grad, Ai.grad, Bi.grad, bi.grad if bi is not None else None])
    return outs


NAMES = ["out", "dx", "dA", "dB", "dbias"]


def check_against_reference(x, w, b, A, B, scale, p, seed, grad_x=True):
    ours, ref_lowp = run_both(x, w, b, A, B, scale, p, seed, grad_x=grad_x)
    up = torch.float64 if x.dtype == torch.float64 else torch.float32
    _, ref32 = run_both(
        x.to(up),
        w.to(up),
        b.to(up) if b is not None else None,
        A.to(torch.float64 if up == torch.float64 else torch.float32),
        B.to(A.dtype if A.dtype == torch.float64 else torch.float32),
        scale,
        p,
        seed,
        grad_x=grad_x,
    )
    for name, o, lo, r32 in zip(NAMES, ours, ref_lowp, ref32):
        if r32 is None:
            assert o is None, name
            continue
        assert o is not None, name
        assert o.shape == r32.shape and o.dtype == lo.dtype, name
        if x.dtype in (torch.float32, torch.float64) and A.dtype == x.dtype:
            tol = dict(TOLERANCES[x.dtype])
            tol["atol"] = tol["atol"] * 10
            torch.testing.assert_close(o.to(r32.dtype), r32, **tol, msg=name)
        else:
            assert_lowp_error_bounded(o, r32, lo, floor=1e-5)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(device, dtype, p, bias):
    x, w, b, A, B = make(37, 45, 29, 5, dtype, device, bias=bias)
    check_against_reference(x, w, b, A, B, 0.7, p, seed=11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_float32_adapters_over_low_precision_base(device, dtype, p):
    x, w, b, A, B = make(40, 33, 21, 4, dtype, device, adapter_dtype=torch.float32)
    check_against_reference(x, w, b, A, B, 2.0, p, seed=3)
    xa = op(x, w, b, A, B, 2.0, p, torch.tensor([3], device=device), 0)[1]
    assert xa.dtype == torch.float32 and xa.shape == (40, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_three_d_and_non_contiguous_inputs(device, p):
    x, w, b, A, B = make(0, 24, 16, 3, torch.float64, device, x_shape=(3, 5, 24))
    check_against_reference(x, w, b, A, B, 1.5, p, seed=5)
    xt = torch.randn(24, 15, dtype=torch.float64, device=device).t()  # non-contiguous rows
    check_against_reference(xt, w, b, A, B, 1.5, p, seed=5)
    xs = torch.randn(4, 6, 48, dtype=torch.float64, device=device)[..., ::2]  # strided features
    check_against_reference(xs, w, b, A, B, 1.5, p, seed=6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_weird_shapes(device, p):
    for T, d_in, d_out, r in [(1, 1, 1, 1), (1, 123, 7, 2), (5, 123, 123, 9), (0, 8, 8, 2)]:
        x, w, b, A, B = make(T, d_in, d_out, r, torch.float64, device)
        check_against_reference(x, w, b, A, B, 0.5, p, seed=T + 1)


# float32 with dropout, in_features a multiple of 8 (the AVX-512 row work) and not (the portable rows).
BOTH_PATHS_SCRIPT = """
import sys, torch, slimtune
from slimtune.lora import lora_linear
gen = torch.Generator().manual_seed(0)
out = []
for T, din, dout, r in [(37, 64, 29, 5), (130, 256, 64, 16), (9, 30, 7, 3)]:
    x = torch.randn(T, din, generator=gen).requires_grad_()
    w = torch.randn(dout, din, generator=gen) / din**0.5
    A = (torch.randn(r, din, generator=gen) / din**0.5).requires_grad_()
    B = torch.randn(dout, r, generator=gen).requires_grad_()
    g = torch.randn(T, dout, generator=gen)
    y = lora_linear(x, w, None, A, B, 0.5, 0.25, seed=3)
    y.backward(g)
    out += [x.detach(), w, A.detach(), B.detach(), g, y.detach(), x.grad, A.grad, B.grad]
torch.save(out, sys.argv[1])
"""


def test_avx512_and_portable_cpu_paths_match_the_reference():
    """SLIMTUNE_CPU_NO_AVX512 reaches the rows every machine without AVX-512 runs; both paths agree
    with the float64 reference given the same dropout mask."""
    for res in on_both_cpu_paths(BOTH_PATHS_SCRIPT):
        for i in range(0, len(res), 9):
            x, w, A, B, g, *ours = res[i : i + 9]
            mask = lora_dropout_mask(x, 0.25, 3)
            leaves = [t.double().requires_grad_() for t in (x, A, B)]
            y = reference.lora_linear(leaves[0], w.double(), None, leaves[1], leaves[2], 0.5, mask, 0.25)
            y.backward(g.double())
            for name, o, r in zip(["y", "dx", "dA", "dB"], ours, [y.detach()] + [t.grad for t in leaves]):
                torch.testing.assert_close(o.double(), r, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("d_in,d_out", [(0, 6), (6, 0)])
def test_no_input_or_no_output_features(device, p, d_in, d_out):
    """A zero-width x or output: the token count comes from the leading sizes (reshape's -1 cannot
    infer it there), and every output and gradient has the reference's shape and values."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, d_in, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64).to(device)
    b = torch.randn(d_out, generator=g, dtype=torch.float64).to(device)
    A = torch.randn(3, d_in, generator=g, dtype=torch.float64).to(device)
    B = torch.randn(d_out, 3, generator=g, dtype=torch.float64).to(device)
    check_against_reference(x, w, b, A, B, 0.5, p, seed=4)


@pytest.mark.parametrize("device", DEVICES)
def test_x_without_grad_and_no_base_weight(device):
    x, w, b, A, B = make(9, 16, 12, 3, torch.float64, device)
    check_against_reference(x, w, b, A, B, 1.0, 0.2, seed=1, grad_x=False)
    # weight=None: the adapter term (plus bias) alone.
    mask = lora_dropout_mask(x, 0.2, 1)
    out = lora_linear(x, None, b, A, B, 1.0, 0.2, seed=1)
    torch.testing.assert_close(out, reference.lora_linear(x, None, b, A, B, 1.0, mask, 0.2))
    xg = x.clone().requires_grad_(True)
    (lora_linear(xg, None, None, A, B, 1.0, 0.2, seed=1) ** 2).sum().backward()
    xr = x.clone().requires_grad_(True)
    (reference.lora_linear(xr, None, None, A, B, 1.0, mask, 0.2) ** 2).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)


def test_trainable_base_weight_gets_its_gradient():
    x, w, b, A, B = make(6, 8, 5, 2, torch.float64, "cpu")
    w1, w2 = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lora_linear(x, w1, b, A, B, 1.0).sum().backward()
    reference.lora_linear(x, w2, b, A, B, 1.0).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)


def test_dropout_mask_statistics_and_determinism():
    x = torch.empty(256, 512)
    m1 = lora_dropout_mask(x, 0.1, seed=42)
    assert torch.equal(m1, lora_dropout_mask(x, 0.1, seed=42))
    assert not torch.equal(m1, lora_dropout_mask(x, 0.1, seed=43))
    assert not torch.equal(m1, lora_dropout_mask(x, 0.1, seed=42, offset=1))
    assert abs(m1.float().mean().item() - 0.9) < 0.005
    assert lora_dropout_mask(x, 0.0, 1).all()
    # The mask depends only on the row-major element index: a 3-D view gives the same bits.
    assert torch.equal(lora_dropout_mask(x.view(8, 32, 512), 0.1, 42).view(256, 512), m1)
    # Rows do not repeat each other (the counter covers the whole tensor).
    assert not torch.equal(m1[0], m1[1])


def test_philox_known_answer():
    """Philox4x32-10 known-answer vector (Random123): counter 0, key 0 -> 6627e8d5 e169c58d bc57ac4c 9b00dbd8.
    Element e of the mask takes 16 bits of block e // 8: with key=(seed lo, seed hi)=0, the block
    counter is (offset + e // 8, 0, "LoRA", 0), so the vector is checked through the whole-word
    thresholds: p = 0 keeps all, and keep bits at p = 0.5 are the top bits of each 16-bit half."""

    def philox(c, k):
        M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
        c, k = list(c), list(k)
        for _ in range(10):
            p0, p1 = M0 * c[0], M1 * c[2]
            c = [
                ((p1 >> 32) ^ c[1] ^ k[0]) & 0xFFFFFFFF,
                p1 & 0xFFFFFFFF,
                ((p0 >> 32) ^ c[3] ^ k[1]) & 0xFFFFFFFF,
                p0 & 0xFFFFFFFF,
            ]
            k = [(k[0] + W0) & 0xFFFFFFFF, (k[1] + W1) & 0xFFFFFFFF]
        return c

    assert [hex(v) for v in philox([0, 0, 0, 0], [0, 0])] == ["0x6627e8d5", "0xe169c58d", "0xbc57ac4c", "0x9b00dbd8"]
    seed, offset = 0x123456789ABCDEF, 17
    mask = lora_dropout_mask(torch.empty(3, 24), 0.5, seed, offset).view(-1)
    expect = []
    for blk in range(9):
        words = philox([(offset + blk) & 0xFFFFFFFF, 0, 0x4C6F5241, 0], [seed & 0xFFFFFFFF, seed >> 32])
        for i in range(8):
            half = (words[i // 2] >> (16 * (i % 2))) & 0xFFFF
            expect.append(half >= 32768)
    assert mask.tolist() == expect


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    x, w, b, A, B = make(300, 64, 48, 8, torch.float32, device)
    r1 = run_both(x, w, b, A, B, 1.0, 0.1, 9)[0]
    r2 = run_both(x, w, b, A, B, 1.0, 0.1, 9)[0]
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:  # nothing in the op needs a nondeterministic kernel, and the results are the same
        r3 = run_both(x, w, b, A, B, 1.0, 0.1, 9)[0]
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, c, d in zip(r1, r2, r3):
        assert torch.equal(a, c) and torch.equal(a, d)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_saves_only_x_and_the_rank_r_intermediate(p, adapter_dtype):
    T, d_in, d_out, r = 64, 96, 80, 8
    x, w, b, A, B = make(T, d_in, d_out, r, torch.bfloat16, "cpu", adapter_dtype=adapter_dtype)
    x.requires_grad_(True)
    A.requires_grad_(True)
    B.requires_grad_(True)
    params = {id(t) for t in (w, A, B)}
    out, saved = saved_tensors(lambda: lora_linear(x, w, b, A, B, 2.0, p, seed=1))
    # The dropout seed (one int64) is saved too; it is not an activation.
    activations = [t for t in saved if id(t) not in params and t.dtype != torch.int64]
    assert any(t is x for t in activations), "x itself (not a copy) must be saved"
    assert all(t.numel() == 1 for t in saved if t.dtype == torch.int64)
    others = [t for t in activations if t is not x]
    assert len(others) == 1 and others[0].shape == (T, r) and others[0].dtype == torch.float32, [
        (t.shape, t.dtype) for t in others
    ]
    assert all(t.dtype != torch.bool for t in saved), "a mask was saved"
    assert (
        slimtune.saved_bytes(lambda: lora_linear(x, w, b, A, B, 2.0, p, seed=1), exclude=(w, A, B))
        <= x.numel() * x.element_size() + T * r * 4 + 8
    )
    out.sum().backward()
    assert A.grad is not None and x.grad is not None


def test_gradcheck_float64():
    x, w, b, A, B = make(7, 6, 5, 3, torch.float64, "cpu")
    args = [t.requires_grad_(True) for t in (x, b, A, B)]
    for p in (0.0, 0.3):
        fn = lambda x, b, A, B: lora_linear(x, w, b, A, B, 1.3, p, seed=21)  # noqa: E731  fixed mask via the seed
        assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for grad in (False, True):
        for p, adapter_dtype, dtype in [
            (0.0, None, torch.float32),
            (0.2, None, torch.float32),
            (0.2, torch.float32, torch.bfloat16),
        ]:
            x, w, b, A, B = make(10, 12, 9, 3, dtype, device, adapter_dtype=adapter_dtype)
            for t in (x, A, B):
                t.requires_grad_(grad)
            seed = torch.tensor([5], device=device)
            torch.library.opcheck(op, (x, w, b, A, B, 0.5, p, seed, 0))
            torch.library.opcheck(op, (x, None, None, A, B, 0.5, p, seed, 0))
    x, w, b, A, B = make(10, 12, 9, 3, torch.float32, device)
    seed = torch.tensor([5], device=device)
    y, xa = op(x, w, b, A, B, 0.5, 0.2, seed, 0)
    g = torch.randn_like(y)
    torch.library.opcheck(
        torch.ops.slimtune.lora_linear_backward, (g, x, w, A, B, xa, 0.5, 0.2, seed, 0, True, True, True, True)
    )
    torch.library.opcheck(torch.ops.slimtune.lora_dropout_mask, (x, 0.3, torch.tensor([1]), 2))


def test_torch_compile_fullgraph_smoke():
    x, w, b, A, B = make(16, 12, 10, 4, torch.float32, "cpu")
    A.requires_grad_(True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x, A):
        return lora_linear(x, w, b, A, B, 0.5, 0.1, seed=3).relu()

    out = f(x, A)
    ref = reference.lora_linear(x, w, b, A, B, 0.5, lora_dropout_mask(x, 0.1, 3), 0.1).relu()
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert A.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device):
    x, w, b, A, B = make(4, 6, 5, 2, torch.float32, device)
    cases = [
        ("lora_B", "rank", (x, w, b, A, B[:, :1], 1.0, 0.0, None, 0)),
        ("x", "features", (x[:, :5], w, b, A, B, 1.0, 0.0, None, 0)),
        ("weight", "shape", (x, w[:4], b, A, B, 1.0, 0.0, None, 0)),
        ("weight", "dtype", (x, w.double(), b, A, B, 1.0, 0.0, None, 0)),
        ("bias", "shape", (x, w, b[:3], A, B, 1.0, 0.0, None, 0)),
        ("lora_A", "dtype", (x, w, b, A.half(), B.half(), 1.0, 0.0, None, 0)),
        ("lora_B", "dtype", (x, w, b, A, B.double(), 1.0, 0.0, None, 0)),
        ("lora_A", "2-D", (x, w, b, A.view(-1), B, 1.0, 0.0, None, 0)),
        ("x", "float32", (x.int(), w, b, A, B, 1.0, 0.0, None, 0)),
        ("dropout", "[0, 1)", (x, w, b, A, B, 1.0, 1.0, None, 0)),
        ("seed", "must be given", (x, w, b, A, B, 1.0, 0.1, None, 0)),
        ("seed", "int64", (x, w, b, A, B, 1.0, 0.1, torch.tensor([1.0], device=device), 0)),
        ("seed", "one-element", (x, w, b, A, B, 1.0, 0.1, torch.tensor([1, 2], device=device), 0)),
        ("scale", "finite", (x, w, b, A, B, float("nan"), 0.0, None, 0)),
    ]
    for arg, phrase, args in cases:
        with pytest.raises(RuntimeError, match=f"'{arg}'") as e:
            op(*args)
        assert phrase in str(e.value), str(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mask_equals_cpu_mask_and_device_mismatch():
    x = torch.empty(33, 77)
    assert torch.equal(lora_dropout_mask(x, 0.1, 5, 3), lora_dropout_mask(x.cuda(), 0.1, 5, 3).cpu())
    x, w, b, A, B = make(4, 6, 5, 2, torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="'lora_A'"):
        op(x, w, b, A.cpu(), B, 1.0, 0.0, None, 0)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_float64_x_with_float32_adapters_accumulates_in_float64(p):
    """dx, the output and xa are formed in float64 when x is float64, even over float32 adapters:
    rounding x or g B A to float32 would lose half the digits of a float64 input gradient."""
    x, w, b, A, B = make(9, 13, 11, 3, torch.float64, "cpu", adapter_dtype=torch.float32)
    mask = lora_dropout_mask(x, p, 4) if p > 0 else None
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = lora_linear(xo, w, b, A, B, 0.9, p, seed=4)
    yr = reference.lora_linear(xr, w, b, A.double(), B.double(), 0.9, mask, p)
    g = torch.randn(y.shape, dtype=torch.float64)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(y, yr, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(xo.grad, xr.grad, atol=1e-12, rtol=1e-12)
    assert op(x, w, b, A, B, 0.9, p, torch.tensor([4]), 0)[1].dtype == torch.float64
