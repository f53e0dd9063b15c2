"""DoRALinear against the materializing reference, PEFT's DoRA layer and PEFT adapter files."""

import copy

import pytest
import torch
from conftest import DEVICES, assert_close, assert_lowp_error_bounded
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import slimtune
from slimtune import reference
from slimtune.lora.functional import draw_seed, lora_dropout_mask
from slimtune.bench.harness import ProjModel
from slimtune.nn import DoRALinear
from slimtune.nn import dora as dora_mod


def make_layer(d_in=24, d_out=16, r=4, alpha=8, bias=True, device="cpu", dtype=torch.float32, seed=0, **kw):
    """A DoRALinear with non-zero B and a magnitude away from the row norms (so g != 1)."""
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias).to(device, dtype)
    layer = DoRALinear(base, r=r, alpha=alpha, **kw)
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.3)
        layer.lora_magnitude_vector["default"].mul_(torch.rand(d_out, device=device) + 0.5)
    return layer


def params(layer, name="default"):
    return layer.lora_A[name], layer.lora_B[name], layer.lora_magnitude_vector[name]


def ref_forward(layer, x, mask=None, p=0.0):
    A, B, m = params(layer)
    return reference.dora_linear(x, layer.base.weight, layer.base.bias, A, B, layer.scaling("default"), m, mask, p)


def grads(y, inputs, g):
    return torch.autograd.grad(y, inputs, g)


# -- the row norms ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [None, 40])
def test_weight_norm_matches_materialized(device, dtype, block, monkeypatch):
    if block is not None:  # several row blocks, a ragged last one
        monkeypatch.setattr(dora_mod, "ROW_BLOCK_ELEMENTS", block)
    layer = make_layer(d_in=13, d_out=11, r=3, device=device, dtype=dtype)
    A, B, _ = params(layer)
    got = layer.weight_norm("default")
    want = reference.dora_weight_norm(layer.base.weight, A, B, layer.scaling("default"))
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_weight_norm_clamps_cancellation():
    """W0 = -s·B·A: the exact norm is 0; round-off must not give NaN."""
    torch.manual_seed(0)
    A, B = torch.randn(3, 8), torch.randn(5, 3)
    W0 = -(B @ A) * 2.0
    n = dora_mod.dora_weight_norm(W0, A, B, 2.0)
    assert torch.isfinite(n).all() and n.abs().max() < 1e-2


# -- forward and backward against the reference ---------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5,), (2, 7), (0,)], ids=["2d", "3d", "empty"])
def test_float32_matches_reference(device, bias, shape):
    layer = make_layer(d_in=23, d_out=17, r=5, bias=bias, device=device)
    x = torch.randn(*shape, 23, device=device, requires_grad=True)
    A, B, m = params(layer)
    y = layer(x)
    ref = ref_forward(layer, x)
    assert_close(y, ref)
    g = torch.randn_like(y)
    for got, want in zip(grads(y, (x, A, B, m), g), grads(ref, (x, A, B, m), g)):
        assert_close(got, want, torch.float32)


def test_float64_gradcheck_and_exact_adapter_gradients():
    layer = make_layer(d_in=9, d_out=7, r=3, dtype=torch.float64)
    A, B, m = params(layer)
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    # The row norm is detached (it does not move with x or m): gradcheck holds in x and m exactly
    # (gradcheck perturbs the magnitude Parameter itself, which the layer reads).
    assert torch.autograd.gradcheck(lambda x, m: layer(x), (x, m))
    # In A and B the detached norm makes the gradient differ from the numerical one by design (PEFT's
    # choice); it must equal the reference's exactly.
    y, ref = layer(x), ref_forward(layer, x)
    g = torch.randn_like(y)
    for got, want in zip(grads(y, (A, B, m), g), grads(ref, (A, B, m), g)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def _naive_lowp(layer, x):
    """DoRA as plain PyTorch writes it in the storage dtype: materialized weight, norm, rescale."""
    A, B, m = (t.detach().to(x.dtype).requires_grad_() for t in params(layer))
    w = layer.base.weight + layer.scaling("default") * (B @ A)
    g = m / torch.linalg.vector_norm(w, dim=1).detach()
    return g * (x @ w.t()) + layer.base.bias, (A, B, m)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_bounded(device, dtype):
    layer = make_layer(d_in=64, d_out=48, r=8, device=device, dtype=dtype)
    x = torch.randn(2, 10, 64, device=device, dtype=dtype, requires_grad=True)
    A, B, m = params(layer)
    assert A.dtype == torch.float32  # float32 adapters over a low-precision base
    y = layer(x)
    assert y.dtype == dtype
    ref = ref_forward(layer, x)
    naive, lowp_params = _naive_lowp(layer, x)
    assert_lowp_error_bounded(y, ref, naive)
    g = torch.randn_like(y)
    got = grads(y, (x, A, B, m), g)
    want = grads(ref, (x, A, B, m), g.float())
    eager = grads(naive, (x, *lowp_params), g)
    for a, b, c in zip(got, want, eager):
        assert_lowp_error_bounded(a, b, c)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_autocast_bf16(dropout):
    """Under autocast the base runs in bf16 like F.linear; the row norms stay float32."""
    layer = make_layer(d_in=64, d_out=48, r=8, dropout=dropout).train()
    x = torch.randn(3, 10, 64, requires_grad=True)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        norm = layer.weight_norm("default")
    assert y.dtype == torch.bfloat16 and norm.dtype == torch.float32
    A, B, m = params(layer)
    torch.testing.assert_close(norm, reference.dora_weight_norm(layer.base.weight, A, B, layer.scaling("default")))
    torch.manual_seed(5)
    mask = lora_dropout_mask(x, dropout, draw_seed()) if dropout else None
    ref = ref_forward(layer, x, mask, dropout)
    assert_close(y, ref, torch.bfloat16)
    g = torch.randn_like(ref)
    for got, want in zip(grads(y, (x, A, B, m), g.bfloat16()), grads(ref, (x, A, B, m), g)):
        assert got.dtype == want.dtype
        # bf16 GEMMs: an error of a few bf16 ulps of the largest entry (cancellation makes small entries noisy).
        assert (got - want).abs().max() <= 2e-2 * want.abs().max()


# -- PEFT's DoRA layer with the same weights -------------------------------------------------------------

peft = pytest.importorskip("peft")


class _MaskDropout(nn.Module):
    """PEFT's dropout slot applying slimtune's Philox mask, so both sides drop the same elements."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        return x * lora_dropout_mask(x, self.p, self.seed) / (1.0 - self.p)


def peft_twin(layer, dropout=0.0, rslora=False):
    cfg = peft.LoraConfig(
        r=layer.r["default"],
        lora_alpha=layer.lora_alpha["default"],
        lora_dropout=dropout,
        use_rslora=rslora,
        target_modules=["proj"],
        use_dora=True,
    )
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.base.bias is not None)
    plain.load_state_dict(layer.base.state_dict())
    pl = peft.get_peft_model(ProjModel(plain), cfg).base_model.model.proj
    A, B, m = params(layer)
    with torch.no_grad():
        pl.lora_A["default"].weight.copy_(A)
        pl.lora_B["default"].weight.copy_(B)
        pl.lora_magnitude_vector["default"].weight.copy_(m)
    pl_params = (pl.lora_A["default"].weight, pl.lora_B["default"].weight, pl.lora_magnitude_vector["default"].weight)
    return pl, pl_params


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("rslora", [False, True])
def test_matches_peft_layer(dropout, rslora):
    layer = make_layer(d_in=20, d_out=12, r=4, dropout=dropout, rslora=rslora).train()
    pl, pl_params = peft_twin(layer, dropout, rslora)
    pl.train()
    x = torch.randn(3, 5, 20, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    if dropout:
        torch.manual_seed(7)
        pl.lora_dropout["default"] = _MaskDropout(dropout, draw_seed())
    y_peft = pl(x)
    torch.testing.assert_close(y, y_peft, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    ours = grads(y, (x, *params(layer)), g)
    theirs = grads(y_peft, (x, *pl_params), g)
    for name, a, b in zip(("x", "A", "B", "m"), ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"gradient of {name}")


# -- dropout -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("contiguous", [True, False])
def test_dropout_matches_reference_with_the_same_mask(contiguous):
    p = 0.25
    layer = make_layer(d_in=19, d_out=9, r=3, dropout=p).train()
    leaf = torch.randn(2, 6, 19, requires_grad=True) if contiguous else torch.randn(19, 6, 2, requires_grad=True)
    x = leaf if contiguous else leaf.permute(2, 1, 0)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    mask = lora_dropout_mask(x, p, draw_seed())
    assert 0 < mask.sum() < mask.numel()
    ref = ref_forward(layer, x, mask, p)
    assert_close(y, ref)
    g = torch.randn_like(y)
    for got, want in zip(grads(y, (x, *params(layer)), g), grads(ref, (x, *params(layer)), g)):
        assert_close(got, want, torch.float32)
    # PEFT's rule: the base output of the layer is on the undropped x, the rescaled part on the dropped x;
    # in eval the dropout is off and the output is g·(x·Wᵀ) + b.
    without = ref_forward(layer, x)
    assert (y - without).abs().max() > 1e-3
    layer.eval()
    assert_close(layer(x), without)


def test_dropout_keeps_no_dropped_copy_of_x():
    layer = make_layer(d_in=64, d_out=32, r=4, dropout=0.1).train()
    x = torch.randn(128, 64, requires_grad=True)
    saved = slimtune.saved_bytes(layer, x)
    # x once, the rescaled output (T x d_out) for m's gradient, and small tensors; no second x-sized tensor.
    assert saved < x.numel() * 4 + 128 * 32 * 4 + 16 * 1024, saved


# -- no weight-sized temporary ------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op allocates (its output, in elements); views of an input
    (detach, slices, reshapes) are not new memory and are left out."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                if t.numel() > self.largest:
                    self.largest, self.op = t.numel(), func
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_no_weight_sized_temporary(dtype, dropout):
    d_in, d_out, T = 96, 80, 40  # the biggest activation (T x max(d)) is smaller than the weight
    layer = make_layer(d_in=d_in, d_out=d_out, r=4, dtype=dtype, dropout=dropout).train()
    x = torch.randn(T, d_in, dtype=dtype, requires_grad=True)
    layer.refresh()  # count the cached ‖W0‖² pass too
    with LargestTensor() as meter:
        layer(x).sum().backward()
    assert meter.largest < d_out * d_in, (meter.largest, meter.op)
    # The meter sees a weight-sized tensor where one is made: the reference's merged weight.
    with LargestTensor() as meter:
        ref_forward(layer, x).sum().backward()
    assert meter.largest >= d_out * d_in


# -- merge, cache, save/load ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_equals_forward_and_unmerge_restores(dtype):
    layer = make_layer(dtype=dtype).eval()
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(6, 24, dtype=dtype)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged
        assert_close(layer(x), y)
        assert_close(nn.functional.linear(x, layer.base.weight, layer.base.bias), y)
        layer.unmerge()
        assert not layer.merged
        assert_close(layer.base.weight, w0, dtype)
        assert_close(layer(x), y)  # the cached ‖W0‖² follows W0 back


def test_merge_refuses_non_finite_and_leaves_weight():
    layer = make_layer()
    w0 = layer.base.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.base.weight, w0)


def test_base_norm_cache_follows_w0():
    layer = make_layer().eval()
    x = torch.randn(4, 24)
    with torch.no_grad():
        layer(x)
        layer.base.weight.mul_(1.5)  # in place
        assert_close(layer(x), ref_forward(layer, x))
        layer.base.load_state_dict({"weight": torch.randn(16, 24), "bias": layer.base.bias.clone()})
        assert_close(layer(x), ref_forward(layer, x))
    layer.double()
    assert_close(layer(x.double()), ref_forward(layer, x.double()))
    layer.float()
    with torch.no_grad():
        layer(x)
        # A move that keeps the address and the version counter (a write through .data is not counted,
        # a .half().float() round trip may reuse the address): any .to()/.float()/... drops the cache.
        layer.base.weight.data.mul_(0.5)
        layer.float()
        assert_close(layer(x), ref_forward(layer, x))


def test_adapter_state_and_save_load(tmp_path):
    from _adapter_fixtures import TinyLM

    torch.manual_seed(0)
    model = slimtune.apply_dora(TinyLM(), r=4, alpha=8, dropout=0.1)
    layers = [m for m in model.modules() if isinstance(m, DoRALinear)]
    assert len(layers) == 4
    assert set(layers[0].adapter_state()) == {"lora_A.default", "lora_B.default", "lora_magnitude_vector.default"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) for n in trainable)
    with torch.no_grad():
        for m in layers:
            m.lora_B["default"].normal_()
            m.lora_magnitude_vector["default"].mul_(1.2)
    model.eval()
    ids = torch.randint(0, 32, (2, 7))
    want = model(ids)
    slimtune.save(model, tmp_path / "a")
    torch.manual_seed(0)
    fresh = slimtune.load(TinyLM(), tmp_path / "a").eval()
    torch.testing.assert_close(fresh(ids), want)
    merged = slimtune.merge(fresh)
    assert not any(isinstance(m, DoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(ids), want, atol=1e-5, rtol=1e-5)


# -- bad input ------------------------------------------------------------------------------------------


def test_bad_input():
    with pytest.raises(TypeError, match="'base' must be an nn.Linear"):
        DoRALinear(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="'r'"):
        DoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="'dropout'"):
        DoRALinear(nn.Linear(4, 4), dropout=1.0)
    layer = make_layer()
    layer.add_adapter("other", r=2)
    assert layer.lora_magnitude_vector["other"].shape == (16,)
    with pytest.raises(ValueError, match="'names' must name exactly one adapter"):
        layer.set_adapter(["default", "other"])
    with pytest.raises(KeyError, match="unknown adapter"):
        layer.set_adapter("missing")
    layer.delete_adapter("other")
    assert "other" not in layer.lora_magnitude_vector
    with pytest.raises(RuntimeError, match="x"):
        layer(torch.randn(3, 5))  # wrong number of features


# -- PEFT adapter files ---------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

from _adapter_fixtures import tiny_llama  # noqa: E402


def peft_dora_checkpoint(path, model):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, use_dora=True
    )
    pm = peft.get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(torch.rand_like(p) + 0.5)
    pm.save_pretrained(path)
    return pm


def test_peft_dora_adapter_load_and_export(tmp_path):
    from slimtune.lora import export_peft_adapter, load_peft_adapter

    model = tiny_llama()
    pm = peft_dora_checkpoint(tmp_path / "peft", model)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = pm(ids).logits
    ours = load_peft_adapter(copy.deepcopy(model), tmp_path / "peft").eval()
    replaced = [m for m in ours.modules() if isinstance(m, DoRALinear)]
    assert len(replaced) == 6
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, atol=1e-5, rtol=1e-5)
    export_peft_adapter(ours, tmp_path / "out")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_peft_dora_adapter_bad_files(tmp_path):
    from safetensors.torch import load_file, save_file

    from slimtune.lora import export_peft_adapter, load_peft_adapter
    from slimtune.lora.peft import PeftAdapterError

    model = tiny_llama()
    peft_dora_checkpoint(tmp_path, model)
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(k for k in weights if k.endswith("lora_magnitude_vector"))
    before = copy.deepcopy(model.state_dict())
    for bad in ({k: v for k, v in weights.items() if k != key}, {**weights, key: weights[key][:-1]}):
        save_file(bad, str(tmp_path / "adapter_model.safetensors"))
        with pytest.raises(PeftAdapterError, match="lora_magnitude_vector|tensors"):
            load_peft_adapter(model, tmp_path)
        assert not any(isinstance(m, DoRALinear) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # One PEFT adapter cannot mix LoRA and DoRA layers.
    mixed = nn.Sequential(DoRALinear(nn.Linear(4, 4)), slimtune.nn.LoRALinear(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="use_dora"):
        export_peft_adapter(mixed, tmp_path / "mixed")
