import pytest
import torch

from slimtune import reference
from slimtune.lora import lora_dropout_mask, lora_linear_multi
from conftest import DEVICES, assert_lowp_error_bounded

op = torch.ops.slimtune.lora_linear_multi


def make(device, dtype=torch.float64, adapter_dtype=None, shape=(3, 5, 24), outs=(16, 8, 8), ranks=(4, 2, 3)):
    g = torch.Generator().manual_seed(3)
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)
    d_in = shape[-1]
    ws = [
        (torch.randn(o, d_in, generator=g, dtype=torch.float64) * max(d_in, 1) ** -0.5).to(device, dtype) for o in outs
    ]
    bs = [
        torch.randn(o, generator=g, dtype=torch.float64).to(device, dtype) if i != 1 else None
        for i, o in enumerate(outs)
    ]
    As = [(torch.randn(r, d_in, generator=g, dtype=torch.float64) * 0.3).to(device, adapter_dtype) for r in ranks]
    Bs = [
        (torch.randn(o, r, generator=g, dtype=torch.float64) * 0.3).to(device, adapter_dtype)
        for o, r in zip(outs, ranks)
    ]
    return x, ws, bs, As, Bs


def grads(fn, x, bs, As, Bs):
    leaves = [x.detach().clone().requires_grad_(True)]
    b2 = [b.detach().clone().requires_grad_(True) if b is not None else None for b in bs]
    A2 = [A.detach().clone().requires_grad_(True) for A in As]
    B2 = [B.detach().clone().requires_grad_(True) for B in Bs]
    outs = fn(leaves[0], b2, A2, B2)
    g = torch.Generator().manual_seed(9)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device)).sum() for o in outs)
    loss.backward()
    return (
        [o.detach() for o in outs]
        + [leaves[0].grad]
        + [b.grad for b in b2 if b is not None]
        + [A.grad for A in A2]
        + [B.grad for B in B2]
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
# The last two: no input features, and a projection with no outputs (no token count to infer).
@pytest.mark.parametrize("shape,outs", [((3, 5, 24), (16, 8, 8)), ((3, 5, 0), (16, 8, 8)), ((3, 5, 24), (16, 0, 8))])
def test_matches_per_projection_reference_with_a_shared_mask(device, p, shape, outs):
    x, ws, bs, As, Bs = make(device, shape=shape, outs=outs)
    scales = [0.5, 2.0, 1.5]
    mask = lora_dropout_mask(x, p, 13) if p > 0 else None
    ours = grads(lambda x, b, A, B: lora_linear_multi(x, ws, b, A, B, scales, p, seed=13), x, bs, As, Bs)
    ref = grads(
        lambda x, b, A, B: [
            reference.lora_linear(x, w, bi, Ai, Bi, s, mask, p) for w, bi, Ai, Bi, s in zip(ws, b, A, B, scales)
        ],
        x,
        bs,
        As,
        Bs,
    )
    assert len(ours) == len(ref)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_adapters_over_low_precision_base(dtype):
    x, ws, bs, As, Bs = make("cpu", dtype, adapter_dtype=torch.float32)
    scales = [1.0, 1.0, 2.0]
    mask = lora_dropout_mask(x, 0.1, 2)
    ours = grads(lambda x, b, A, B: lora_linear_multi(x, ws, b, A, B, scales, 0.1, seed=2), x, bs, As, Bs)
    lowp = grads(
        lambda x, b, A, B: [
            reference.lora_linear(x, w, bi, Ai, Bi, s, mask, 0.1) for w, bi, Ai, Bi, s in zip(ws, b, A, B, scales)
        ],
        x,
        bs,
        As,
        Bs,
    )
    up = lambda t: t.float() if t is not None else None  # noqa: E731
    ref = grads(
        lambda x, b, A, B: [
            reference.lora_linear(x, up(w), bi, Ai, Bi, s, mask, 0.1) for w, bi, Ai, Bi, s in zip(ws, b, A, B, scales)
        ],
        x.float(),
        [up(b) for b in bs],
        As,
        Bs,
    )
    for o, lo, r in zip(ours, lowp, ref):
        assert_lowp_error_bounded(o, r, lo, floor=1e-5)


def test_saves_x_once_and_unused_outputs_are_fine():
    x, ws, bs, As, Bs = make("cpu", torch.float32)
    x.requires_grad_(True)
    for A in As:
        A.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        outs = lora_linear_multi(x, ws, bs, As, Bs, [1.0, 1.0, 1.0], 0.2, seed=1)
    params = {id(t) for t in (*ws, *As, *Bs)}
    # The dropout seed (one int64) is saved too; it is not an activation.
    acts = [t for t in saved if id(t) not in params and t.dtype != torch.int64]
    assert sum(t is x for t in acts) == 1 and len(acts) == 2
    assert acts[1].shape == (15, 9) and all(t.dtype != torch.bool for t in saved)
    outs[0].sum().backward()  # K and V unused: their gradients are None
    assert As[0].grad is not None and As[1].grad.abs().sum() == 0


def test_gradcheck_opcheck_compile():
    x, ws, bs, As, Bs = make("cpu", torch.float64, shape=(4, 6), outs=(5, 3), ranks=(2, 3))
    args = [x.requires_grad_(True)] + [A.requires_grad_(True) for A in As] + [B.requires_grad_(True) for B in Bs]

    def fn(x, A0, A1, B0, B1):
        return tuple(lora_linear_multi(x, ws, bs[:2], [A0, A1], [B0, B1], [0.7, 1.3], 0.25, seed=4))

    assert torch.autograd.gradcheck(fn, args)
    for grad in (False, True):
        x2, ws2, bs2, As2, Bs2 = make("cpu", torch.float32)
        bs2 = [b if b is not None else x2.new_empty((0,)) for b in bs2]
        for t in (x2, *As2, *Bs2):
            t.requires_grad_(grad)
        torch.library.opcheck(op, (x2, ws2, bs2, As2, Bs2, [1.0, 0.5, 2.0], 0.1, torch.tensor([3]), 0))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return lora_linear_multi(x, ws, bs[:2], As, Bs, [0.7, 1.3], 0.25, seed=4)[1] * 2

    torch.testing.assert_close(f(x.detach()), fn(x.detach(), *As, *Bs)[1] * 2)


def test_bad_lists_name_the_argument():
    x, ws, bs, As, Bs = make("cpu", torch.float32)
    bs = [b if b is not None else x.new_empty((0,)) for b in bs]
    with pytest.raises(RuntimeError, match="'lora_As'"):
        op(x, ws, bs, As[:2], Bs, [1.0] * 3, 0.0, None, 0)
    with pytest.raises(RuntimeError, match="'scales'"):
        op(x, ws, bs, As, Bs, [1.0], 0.0, None, 0)
    with pytest.raises(RuntimeError, match="'lora_B'"):
        op(x, ws, bs, As, [Bs[0], Bs[1][:, :1], Bs[2]], [1.0] * 3, 0.0, None, 0)
