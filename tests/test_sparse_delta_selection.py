"""Selection methods of sparse deltas against plain dense computations."""

import pytest
import torch
from torch import nn

import slimtune
from slimtune.nn import SparseDeltaLinear
from slimtune.sparse import random_positions, reselect_from_gradients, select_blocks_across_layers


def test_gps_selects_per_neuron():
    torch.manual_seed(0)
    w = torch.randn(64, 48)
    # A few rows dominate the gradient: a global top-k leaves most neurons without an entry.
    g = torch.randn(64, 48) * torch.where(torch.arange(64) < 8, 50.0, 1.0)[:, None]
    k = 64 * 3 + 10
    glob = slimtune.select_indices(w, k=k, method="gradient", scores=g).long()
    assert (glob // 48).unique().numel() < 32
    gps = slimtune.select_indices(w, k=k, method="gps", scores=g, block_bytes=48 * 4 * 5).long()
    assert gps.numel() == k and bool((gps[1:] > gps[:-1]).all())
    per_row = torch.bincount(gps // 48, minlength=64)
    assert int(per_row.min()) == 3 and int(per_row.max()) == 4 and int((per_row == 4).sum()) == 10
    top_rows = g.abs().sum(1).topk(10).indices
    assert torch.equal(per_row[top_rows], torch.full((10,), 4))
    for r in range(64):
        mine = (gps[gps // 48 == r] % 48).sort().values
        assert torch.equal(mine, g[r].abs().topk(int(per_row[r])).indices.sort().values), r
    with pytest.raises(ValueError, match="structure"):
        slimtune.select_indices(w, k=10, method="gps", scores=g, structure="rows")


def test_blocked_selection_equals_a_dense_top_k():
    w = torch.randn(37, 29)
    for bb in (29 * 4, 29 * 4 * 7, 1 << 20):  # one row, seven rows, everything per block
        got = slimtune.select_indices(w, k=50, method="magnitude", block_bytes=bb).long()
        assert torch.equal(got, w.abs().reshape(-1).topk(50).indices.sort().values)


def test_random_positions_are_distinct_uniform_and_avoid_the_excluded_set():
    gen = torch.Generator().manual_seed(0)
    ex = torch.arange(0, 1000, 3)
    got = random_positions(1000, 200, gen, exclude=ex)
    assert got.numel() == 200 and got.unique().numel() == 200 and not bool(torch.isin(got, ex).any())
    counts = torch.zeros(1000)
    for _ in range(200):
        counts[random_positions(1000, 50, gen)] += 1
    assert abs(counts.mean().item() - 10) < 1e-6 and counts.std().item() < 5  # binomial(200, 0.05): std ≈ 3.1
    dense = random_positions(10, 8, gen, exclude=torch.tensor([1]))
    assert dense.numel() == 8 and 1 not in dense.tolist()


def test_smt_blocks_share_one_budget_across_layers():
    torch.manual_seed(0)
    scores = {"a": torch.randn(32, 32) * 10, "b": torch.randn(32, 16), "c": torch.randn(16, 32) * 0.1}
    out = select_blocks_across_layers(scores, k=6 * 64, block_size=8)
    assert set(out) == {"a", "b", "c"}
    total = sum(v.numel() for v in out.values())
    assert total == 6 * 64
    assert out["a"].numel() == 6 * 64 and out["c"].numel() == 0  # the loud layer wins the whole budget
    # The chosen tiles are a's best by mean |score|.
    tiles = scores["a"].abs().view(4, 8, 4, 8).mean((1, 3)).reshape(-1)
    got_tiles = ((out["a"].long() // 32) // 8 * 4 + (out["a"].long() % 32) // 8).unique()
    assert torch.equal(got_tiles.sort().values, tiles.topk(6).indices.sort().values)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        SparseDeltaLinear(nn.Linear(12, 20), density=0.1),
        nn.Tanh(),
        SparseDeltaLinear(nn.Linear(20, 6), k=24, structure="rows"),
    )


@pytest.mark.parametrize("method", ["gradient", "fisher", "gps"])
@pytest.mark.parametrize("budget", [None, 1 << 20])
def test_reselect_from_gradients_matches_dense_gradients(method, budget):
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 12, generator=gen), torch.randn(8, 6, generator=gen)) for _ in range(3)]
    model = _model()
    # Plain autograd on a dense copy: per-batch weight gradients at zero delta.
    dense = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6))
    dense[0].load_state_dict(model[0].base.state_dict())
    dense[2].load_state_dict(model[2].base.state_dict())
    grads = {0: [], 2: []}
    for x, y in batches:
        dense.zero_grad()
        torch.nn.functional.mse_loss(dense(x), y).backward()
        for i in grads:
            grads[i].append(dense[i].weight.grad.clone())
    seen = []

    def loss_fn(m, batch):
        seen.append(sum(len(layer._grad_observers) for layer in (m[0], m[2])))
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    passes = reselect_from_gradients(model, batches, loss_fn, method=method, memory_budget=budget)
    assert passes == (2 if budget is None else 1)
    assert max(seen) == (1 if budget is None else 2)
    for i in (0, 2):
        layer = model[i]
        s = sum(g.square() for g in grads[i]) if method == "fisher" else sum(grads[i])
        how = "gradient" if method == "gps" and layer.structure == "rows" else method
        expected = slimtune.select_indices(
            layer.base.weight, k=layer.indices.numel(), method=how, scores=s, structure=layer.structure
        )
        assert torch.equal(layer.indices, expected), i
        assert bool((layer.values == 0).all()) and layer.values.grad is None


def test_s2ft_couples_heads_across_projections():
    torch.manual_seed(0)
    heads, hd, hidden = 4, 3, 10
    scores = {
        "q": torch.randn(heads * hd, hidden),
        "v": torch.randn(heads * hd, hidden),
        "o": torch.randn(hidden, heads * hd),
    }
    scores["o"][:, 2 * hd : 3 * hd] *= 100  # head 2 matters most
    scores["q"][0:hd] *= 30  # then head 0
    out = slimtune.sparse.select_coupled_channels(scores, ["q", "v"], ["o"], n_groups=2, group_size=hd)
    chan = torch.tensor([0, 1, 2, 6, 7, 8])
    for n in ("q", "v"):
        assert torch.equal(out[n].long(), (chan[:, None] * hidden + torch.arange(hidden)).reshape(-1))
    assert torch.equal(out["o"].long(), (torch.arange(hidden)[:, None] * heads * hd + chan).reshape(-1))
    # The selection is a valid delta for each layer, e.g. SparseDeltaLinear.set_delta.
    m = SparseDeltaLinear(nn.Linear(hidden, heads * hd), k=5)
    m.set_delta(out["q"])
    assert m.values.numel() == out["q"].numel()
    with pytest.raises(ValueError, match="channel count"):
        slimtune.sparse.select_coupled_channels({"a": torch.randn(4, 5), "b": torch.randn(5, 3)}, ["a"], ["b"], 1)
    with pytest.raises(ValueError, match="group_size"):
        slimtune.sparse.select_coupled_channels(scores, ["q"], ["o"], 1, group_size=5)
