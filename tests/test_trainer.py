"""transformers.Trainer trains a converted model: finite loss, only adapter parameters change."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from slimtune import convert  # noqa: E402

from _adapter_fixtures import tiny_hf  # noqa: E402


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train(model, tmp_path, steps=4):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data())
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
