import pytest
import torch

import slimtune
from slimtune import reference
from conftest import DEVICES, assert_close, device_dtype_params

op = torch.ops.slimtune.sparse_delta_merge_


def make(shape, density, dtype, device, index_dtype=torch.int64, value_dtype=None, sort=True):
    weight = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    numel = weight.numel()
    k = max(1, int(numel * density)) if numel else 0
    perm = torch.randperm(numel)[:k]
    idx = perm.sort().values if sort else perm
    values = torch.randn(k, dtype=torch.float64).to(device=device, dtype=value_dtype or dtype)
    return weight, idx.to(device=device, dtype=index_dtype), values


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(64, 48), (5, 123, 7), (1, 1), (300,)])
def test_matches_reference(device, dtype, index_dtype, shape):
    weight, idx, values = make(shape, 0.1, dtype, device, index_dtype)
    expected = reference.sparse_delta_merge(weight, idx, values, alpha=0.75)
    out = slimtune.functional.sparse_delta_merge_(weight, idx, values, alpha=0.75)
    assert out is weight
    assert_close(weight, expected)
    if device == "cpu":
        assert torch.equal(weight, expected), "CPU kernel rounds once in opmath, exactly like the reference"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_values_over_low_precision_weight(device, dtype):
    weight, idx, values = make((33, 65), 0.2, dtype, device, torch.int32, value_dtype=torch.float32)
    expected = reference.sparse_delta_merge(weight, idx, values, alpha=-1.5)
    op(weight, idx, values, -1.5)
    assert_close(weight, expected)
    # A float32 master value must not be rounded to the weight dtype before the add:
    # a value below the weight's resolution still moves the sum when added in float32.
    w = torch.full((4,), 1.0, dtype=dtype, device=device)
    # 0.5 eps + a little: rounded to the weight dtype first it becomes exactly 0.5 eps and the
    # sum ties back to 1; formed in float32 it rounds up to 1 + eps.
    tiny = torch.full((2,), (0.5 + 2.0**-13) * torch.finfo(dtype).eps, device=device)
    assert torch.equal(
        torch.ones(2, dtype=dtype, device=device) + tiny.to(dtype), torch.ones(2, dtype=dtype, device=device)
    )
    op(w, torch.tensor([0, 1], device=device), tiny, 1.0)
    assert torch.equal(
        w,
        reference.sparse_delta_merge(
            torch.ones(4, dtype=dtype, device=device), torch.tensor([0, 1], device=device), tiny
        ),
    )
    assert (w[:2] > 1).all(), "the value was rounded to the weight dtype before the add"


@pytest.mark.parametrize("device", DEVICES)
def test_unsorted_indices_and_untouched_positions(device):
    weight, idx, values = make((40, 40), 0.05, torch.float32, device, sort=False)
    before = weight.clone()
    op(weight, idx, values, 1.0)
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=device)
    mask[idx.long()] = True
    assert torch.equal(weight.view(-1)[~mask], before.view(-1)[~mask])
    assert_close(weight.view(-1)[idx.long()], before.view(-1)[idx.long()] + values)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_delta_is_a_no_op(device):
    weight = torch.randn(8, 8, device=device)
    before = weight.clone()
    op(weight, torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, device=device), 2.0)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_then_unmerge_round_trips(device):
    weight, idx, values = (
        make((128, 96), 0.05, torch.float64, "cpu") if device == "cpu" else make((128, 96), 0.05, torch.float32, device)
    )
    before = weight.clone()
    op(weight, idx, values, 1.0)
    op(weight, idx, values, -1.0)
    torch.testing.assert_close(weight, before, atol=1e-6, rtol=0)


def _bad_inputs(device):
    w = torch.randn(4, 5, device=device)
    i = torch.tensor([0, 3, 7], device=device)
    v = torch.randn(3, device=device)
    yield "indices", "out of range", (w, torch.tensor([0, 3, 20], device=device), v, 1.0)
    yield "indices", "out of range", (w, torch.tensor([0, -1, 7], device=device), v, 1.0)
    yield "indices", "more than once", (w, torch.tensor([7, 3, 7], device=device), v, 1.0)
    yield "indices", "int32 or int64", (w, i.float(), v, 1.0)
    yield "indices", "1-D", (w, i.view(3, 1), v, 1.0)
    yield "weight", "float32, float16, bfloat16", (w.to(torch.int32), i, v.to(torch.int32), 1.0)
    yield "weight", "contiguous", (torch.randn(5, 4, device=device).t(), i, v, 1.0)
    yield "values", "elements", (w, i, torch.randn(2, device=device), 1.0)
    yield "values", "dtype", (w.half(), i, v.double(), 1.0)
    yield "values", "NaN or infinite", (w, i, torch.tensor([1.0, float("nan"), 0.0], device=device), 1.0)
    yield "values", "NaN or infinite", (w, i, torch.tensor([1.0, float("inf"), 0.0], device=device), 1.0)
    yield "alpha", "finite", (w, i, v, float("inf"))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_and_leave_weight_untouched(device):
    for arg, phrase, (w, i, v, a) in _bad_inputs(device):
        before = w.clone()
        with pytest.raises(RuntimeError, match=f"'{arg}'") as excinfo:
            op(w, i, v, a)
        assert phrase in str(excinfo.value), str(excinfo.value)
        assert torch.equal(w, before), f"weight changed although {arg} was rejected"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mismatch_names_the_argument():
    w = torch.randn(4, 5, device="cuda")
    with pytest.raises(RuntimeError, match="'indices'"):
        op(w, torch.tensor([1, 2]), torch.randn(2, device="cuda"), 1.0)
    with pytest.raises(RuntimeError, match="'values'"):
        op(w, torch.tensor([1, 2], device="cuda"), torch.randn(2), 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    weight, idx, values = make((16, 12), 0.2, torch.float32, device, torch.int32)
    torch.library.opcheck(op, (weight, idx, values, 0.5))
    weight, idx, values = make((16, 12), 0.2, torch.bfloat16, device, torch.int64, value_dtype=torch.float32)
    torch.library.opcheck(op, (weight, idx, values, -2.0))


def test_torch_compile_fullgraph_smoke():
    weight, idx, values = make((32, 32), 0.1, torch.float32, "cpu")
    expected = reference.sparse_delta_merge(weight, idx, values, alpha=0.5)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(w, i, v):
        op(w, i, v, 0.5)
        return w * 1.0

    out = f(weight, idx, values)
    assert_close(out, expected)
    assert_close(weight, expected)
