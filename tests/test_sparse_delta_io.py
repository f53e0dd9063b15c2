import pytest
import torch
from torch import nn

import slimtune
from slimtune.nn import SparseDeltaLinear


def model(seed=0, dout=12):
    torch.manual_seed(seed)
    m = nn.Sequential(
        SparseDeltaLinear(nn.Linear(10, dout), density=0.2), nn.ReLU(), SparseDeltaLinear(nn.Linear(dout, 4), k=7)
    )
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_()
    return m


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_load_round_trip(tmp_path):
    src = model(0)
    path = tmp_path / "delta.safetensors"
    slimtune.save_delta(src, path)
    dst = model(1)
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if "base" in k}, strict=False)
    slimtune.load_delta(dst, path)
    assert same(snapshot(src), snapshot(dst))
    x = torch.randn(3, 10)
    torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
    d = slimtune.read_delta(path)
    assert d["0"]["shape"] == [12, 10] and d["0"]["structure"] == "unstructured"
    assert d["0"]["indices"].dtype == torch.int32 and d["0"]["values"].dtype == torch.float32


def write_tampered(tmp_path, name, fn):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    src = model(0)
    good = tmp_path / "good.safetensors"
    slimtune.save_delta(src, good)
    tensors = load_file(good)
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    fn(tensors)
    bad = tmp_path / name
    save_file(tensors, str(bad), metadata=meta)
    return bad


def _unsorted(t):
    t["0.indices"] = t["0.indices"].flip(0).contiguous()


def _duplicate(t):
    t["0.indices"][1] = t["0.indices"][0]


def _out_of_range(t):
    t["0.indices"][-1] = 10_000


def _short_values(t):
    t["0.values"] = t["0.values"][:-1].contiguous()


@pytest.mark.parametrize(
    "tamper,phrase",
    [
        (_unsorted, "sorted"),
        (_duplicate, "sorted and unique"),
        (_out_of_range, "out of range"),
        (_short_values, "values"),
    ],
)
def test_invalid_files_raise_and_leave_the_model_untouched(tmp_path, tamper, phrase):
    bad = write_tampered(tmp_path, "bad.safetensors", tamper)
    dst = model(1)
    before = snapshot(dst)
    with pytest.raises(ValueError, match=phrase):
        slimtune.load_delta(dst, bad)
    assert same(before, snapshot(dst))


def test_other_shape_and_truncated_and_garbage_files(tmp_path):
    path = tmp_path / "delta.safetensors"
    slimtune.save_delta(model(0), path)
    other = model(1, dout=13)
    before = snapshot(other)
    with pytest.raises(ValueError, match="shape"):
        slimtune.load_delta(other, path)
    assert same(before, snapshot(other))
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) - 20])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    dst = model(2)
    before = snapshot(dst)
    for p in (trunc, garbage):
        with pytest.raises(ValueError, match="truncated or corrupt"):
            slimtune.load_delta(dst, p)
        assert same(before, snapshot(dst))


def test_compose_adds_weighted_deltas(tmp_path):
    a, b = model(0), model(1)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    slimtune.save_delta(a, pa)
    slimtune.save_delta(b, pb)
    # Into a plain model of nn.Linear layers with the same names.
    torch.manual_seed(5)
    plain = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 4))
    w0 = [plain[0].weight.detach().clone(), plain[2].weight.detach().clone()]
    slimtune.compose(plain, [pa, pb], weights=[1.0, 0.5])
    for i, (li, w) in enumerate(zip((0, 2), w0)):
        name = str(li)
        expected = w.clone().view(-1)
        expected.index_add_(0, a[li].indices.long(), a[li].values.detach())
        expected.index_add_(0, b[li].indices.long(), 0.5 * b[li].values.detach())
        torch.testing.assert_close(plain[li].weight.view(-1), expected, atol=1e-6, rtol=1e-6, msg=name)
    # Into the W0 of a wrapped model; an invalid delta in the list changes nothing.
    target = model(3)
    before = snapshot(target)
    with pytest.raises(ValueError):
        slimtune.compose(
            target,
            [
                pa,
                {"0": {"indices": torch.tensor([5, 3], dtype=torch.int32), "values": torch.ones(2), "shape": [12, 10]}},
            ],
        )
    assert same(before, snapshot(target))
    slimtune.compose(target, [pa])
    assert not torch.equal(target[0].base.weight, before["0.base.weight"])
    with pytest.raises(ValueError, match="weights"):
        slimtune.compose(target, [pa, pb], weights=[1.0])


def _block_model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 12))
    # 16x16 tiles cut at the weight's edges: how many entries a layer holds depends on which tiles
    # were drawn.
    slimtune.apply_sparse_delta(model, density=0.3, structure="blocks")
    return model


def test_block_delta_state_dict_loads_into_a_freshly_built_model():
    src = _block_model(0)
    with torch.no_grad():
        for m in src:
            m.values.normal_()
    dst = _block_model(1)
    assert any(a.values.shape != b.values.shape for a, b in zip(src, dst))
    dst.load_state_dict(src.state_dict())
    x = torch.randn(3, 20)
    assert torch.equal(dst(x), src(x))
    for a, b in zip(src, dst):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.rowptr, b.rowptr)
        assert b.values.requires_grad and isinstance(b.values, nn.Parameter)


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda sd: sd.__setitem__("0.indices", sd["0.indices"].flip(0)), "sorted and unique"),
        (lambda sd: sd.__setitem__("0.values", sd["0.values"][:-1]), "0.values has shape"),
        (lambda sd: sd.__setitem__("0.rowptr", torch.zeros_like(sd["0.rowptr"])), "0.rowptr does not match"),
        (lambda sd: sd.__setitem__("0.indices", sd["0.indices"] + 10_000), "out of range"),
    ],
)
def test_block_delta_state_dict_of_another_size_is_checked_first(corrupt, match):
    src, dst = _block_model(0), _block_model(1)
    if src[0].indices.shape == dst[0].indices.shape:
        pytest.skip("the two draws gave layer 0 the same entry count")
    sd = src.state_dict()
    corrupt(sd)
    before = {k: v.clone() for k, v in dst[0].state_dict().items()}
    with pytest.raises(RuntimeError, match=match):
        dst.load_state_dict(sd)
    for k, v in dst[0].state_dict().items():
        assert torch.equal(v, before[k]), k
