"""transformers.Trainer trains a converted model: finite loss, only adapter parameters change."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from slimtune import convert  # noqa: E402

from _adapter_fixtures import TokenData, cpu_training_args, tiny_hf  # noqa: E402


def _train(model, tmp_path, steps=4):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = cpu_training_args(tmp_path, steps, save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData())
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses))), losses
    assert out.global_step == steps
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable, sorted(changed - trainable)
    return changed


def test_trainer_on_converted_llama(tmp_path):
    model = tiny_hf("llama")
    convert.apply(model, "test_scale", target_modules=["q_proj", "v_proj", "down_proj"])
    changed = _train(model, tmp_path)
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(".scale") for n in changed)


def test_trainer_with_apply_lora(tmp_path):
    import slimtune

    model = tiny_hf("llama")
    slimtune.apply_lora(model, r=4, alpha=8)
    changed = _train(model, tmp_path)
    assert all("lora_" in n for n in changed)
