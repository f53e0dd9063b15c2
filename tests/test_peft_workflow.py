"""The README's "Coming from PEFT" scripts, run as written: slimtune's and PEFT's read each other's
files and predict the same; Trainer checkpoints hold adapters only and resume exactly."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import slimtune  # noqa: E402
from slimtune import convert  # noqa: E402

from _adapter_fixtures import tiny_classifier  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet(marker: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- {marker} -->\n```python\n(.*?)```", text, re.S)
    assert m, f"README has no block after <!-- {marker} -->"
    return m.group(1)


def _run(marker, directory, monkeypatch):
    monkeypatch.chdir(directory)
    namespace = {"__name__": f"readme_{marker.replace('-', '_')}"}
    exec(compile(_snippet(marker), f"README.md:{marker}", "exec"), namespace)
    return namespace


def _inputs():
    g = torch.Generator().manual_seed(5)
    return {"input_ids": torch.randint(0, 64, (6, 12), generator=g)}


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(**_inputs()).logits


def test_slimtune_counterpart_runs_and_round_trips(tmp_path, monkeypatch):
    ns = _run("peft-workflow-slimtune", tmp_path, monkeypatch)
    merged, base_model = ns["model"], ns["base_model"]
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert not convert.converted_modules(merged)
    # The new head was trained and saved: a reload predicts what the trained model predicted.
    assert not torch.equal(merged.classifier.weight, base_model().classifier.weight)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    reloaded = slimtune.SlimtuneModel.from_pretrained(base_model(), tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded), _logits(merged), atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in reloaded.parameters())  # PEFT: frozen unless is_trainable
    # Checkpoints hold the adapter and the head, not the model.
    ckpt = tmp_path / "out" / "checkpoint-10"
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved and all(".lora_" in k or k.startswith("base_model.classifier.") for k in saved), sorted(saved)
    full = sum(p.numel() * p.element_size() for p in base_model().parameters())
    assert (ckpt / "model.safetensors").stat().st_size < full / 5
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(base_model(), str(tmp_path / "adapter"))
    torch.testing.assert_close(_logits(theirs), _logits(merged), atol=1e-5, rtol=1e-5)


def test_peft_script_files_load_into_slimtune(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    ns = _run("peft-workflow-peft", tmp_path, monkeypatch)
    ours = slimtune.SlimtuneModel.from_pretrained(ns["base_model"](), tmp_path / "adapter")
    torch.testing.assert_close(_logits(ours), _logits(ns["model"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(ours.merge_and_unload()), _logits(ns["model"]), atol=1e-5, rtol=1e-5)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=32):
        self.ids = torch.randint(0, 64, (n, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": int((self.ids[i] < 8).any())}


def _args(out, steps, **extra):
    return transformers.TrainingArguments(
        str(out),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        **extra,
    )


def test_trainer_matches_peft_from_the_same_weights(tmp_path):
    peft = pytest.importorskip("peft")
    config = dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    theirs = peft.get_peft_model(tiny_classifier(), peft.LoraConfig(**config))
    ours = slimtune.get_peft_model(tiny_classifier(), slimtune.LoraConfig(**config))
    with torch.no_grad():  # PEFT's initial adapter weights in slimtune's layers
        for name, layer in convert.converted_modules(ours.base_model).items():
            other = theirs.base_model.model.get_submodule(name)
            layer.lora_A["default"].copy_(other.lora_A["default"].weight)
            layer.lora_B["default"].copy_(torch.randn_like(layer.lora_B["default"]) * 0.1)
            other.lora_B["default"].weight.copy_(layer.lora_B["default"])
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=1e-5)
    for model, out in ((theirs, "peft"), (ours, "ours")):
        model.train()
        transformers.Trainer(
            model=model, args=_args(tmp_path / out, 6, save_strategy="no"), train_dataset=_Data()
        ).train()
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=1e-5)
    trained = theirs.base_model.model.classifier.modules_to_save["default"].weight
    torch.testing.assert_close(ours.base_model.classifier.weight, trained, atol=1e-5, rtol=1e-5)


class _StopAt(transformers.TrainerCallback):
    """Ends a run early (same schedule as the full run), as an interruption would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_an_adapter_checkpoint_is_exact(tmp_path):
    def run(out, stop=None, resume=None):
        model = slimtune.get_peft_model(
            tiny_classifier(), slimtune.LoraConfig(task_type="SEQ_CLS", r=4, lora_dropout=0.1)
        )
        args = _args(out, 6, save_steps=3, save_strategy="steps")
        callbacks = [slimtune.AdapterCheckpointCallback()] + ([_StopAt(stop)] if stop else [])
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(), callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "a")
    interrupted = run(tmp_path / "b", stop=3)
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoint-3"))
    assert not torch.equal(interrupted.base_model.classifier.weight, straight.base_model.classifier.weight)
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6, msg=n)
    ckpt = tmp_path / "b" / "checkpoint-3"
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved and all(".lora_" in k or ".classifier." in k for k in saved), sorted(saved)


def test_converted_hf_model_save_pretrained_round_trips(tmp_path):
    torch.manual_seed(0)
    from _adapter_fixtures import perturb_adapters, tiny_hf

    model = tiny_hf("gpt2")
    plain_state = copy.deepcopy(model.state_dict())
    slimtune.apply_lora(model, r=4, alpha=8)
    perturb_adapters(model)
    model.save_pretrained(tmp_path)
    # The plain class gets the original base weights, not random ones.
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, plain_state[k], atol=0, rtol=0, msg=k)
    # The same conversion loads the whole checkpoint, adapters included.
    again = slimtune.apply_lora(transformers.GPT2LMHeadModel.from_pretrained(tmp_path), r=4, alpha=8)
    from safetensors.torch import load_file

    missing, unexpected = again.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied to wte, not written
    ids = torch.randint(0, 64, (2, 8))
    model.eval(), again.eval()
    torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
