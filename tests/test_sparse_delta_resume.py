"""Exact resume of SparseDeltaScheduler, and SparseDeltaCallback under transformers.Trainer."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimtune
from slimtune.nn import SparseDeltaLinear


def build(seed, regrow="accumulated_grad"):
    torch.manual_seed(seed)
    model = nn.Sequential(
        SparseDeltaLinear(nn.Linear(16, 24), density=0.1),
        nn.Tanh(),
        SparseDeltaLinear(nn.Linear(24, 24), k=96, structure="rows"),
        nn.Tanh(),
        nn.Linear(24, 4),
    )
    torch.manual_seed(0)  # the frozen base weights must agree between runs
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = slimtune.SparseDeltaScheduler(
        model, opt, every=5, accumulate_steps=3, drop_fraction=0.3, total_steps=40, regrow=regrow
    )
    return model, opt, sched


def train(model, opt, sched, batches):
    for x, y in batches:
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize(
    "stop,regrow",
    [(4, "accumulated_grad"), (5, "accumulated_grad"), (8, "accumulated_grad"), (4, "momentum_approx"), (4, "random")],
)  # in a window, at an update, before
def test_resume_is_identical_to_an_uninterrupted_run(stop, regrow):
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(12, 16, generator=gen), torch.randn(12, 4, generator=gen)) for _ in range(17)]
    model, opt, sched = build(0, regrow)
    train(model, opt, sched, batches[:stop])
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    train(model, opt, sched, batches[stop:])
    assert sched.updates == 3

    model2, opt2, sched2 = build(123, regrow)  # different delta indices until the state is loaded
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    train(model2, opt2, sched2, batches[stop:])
    assert sched2.updates == sched.updates and sched2.step_count == 17
    for (n, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), n


def test_load_state_dict_rejects_a_different_schedule():
    model, opt, sched = build(0)
    state = sched.state_dict()
    other = slimtune.SparseDeltaScheduler(model, opt, every=7)
    with pytest.raises(ValueError, match="every"):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    "field,value",
    [("total_steps", 60), ("total_steps", None), ("drop_fraction", 0.5), ("decay", "cosine"), ("seed", 1)]
    + [("score_dtype", torch.bfloat16)],
)
def test_load_state_dict_rejects_a_schedule_that_would_drift(field, value):
    """Each of these changes which entries later updates drop and regrow: a resumed run would differ."""
    model, opt, sched = build(0)
    state = copy.deepcopy(sched.state_dict())
    kwargs = dict(every=5, accumulate_steps=3, drop_fraction=0.3, total_steps=40)
    other = slimtune.SparseDeltaScheduler(model, opt, **{**kwargs, field: value})
    with pytest.raises(ValueError, match=field):
        other.load_state_dict(state)
    same = slimtune.SparseDeltaScheduler(model, opt, **kwargs)
    same.load_state_dict(state)
    assert same.state_dict()["config"] == state["config"]


transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _sparse_llama():
    from _adapter_fixtures import tiny_hf

    model = tiny_hf("llama")
    slimtune.apply_sparse_delta(model, density=0.05)
    return model


def _trainer(model, tmp_path, steps, save_steps=None):
    from _adapter_fixtures import TokenData, cpu_training_args

    args = cpu_training_args(
        tmp_path,
        steps,
        learning_rate=1e-2,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        gradient_accumulation_steps=2,
    )
    cb = slimtune.SparseDeltaCallback(every=3, accumulate_steps=2, drop_fraction=0.3)
    return transformers.Trainer(model=model, args=args, train_dataset=TokenData(n=32), callbacks=[cb]), cb


def _deltas(model):
    return {n: t.clone() for n, t in model.state_dict().items() if n.endswith((".indices", ".values"))}


def test_callback_updates_indices_under_trainer_and_resumes(tmp_path):
    model = _sparse_llama()
    before = _deltas(model)
    trainer, cb = _trainer(model, tmp_path, steps=7, save_steps=4)
    trainer.train()  # uninterrupted; checkpoint-4 (inside the second accumulation window) is a side effect
    assert cb.scheduler.updates == 2 and cb.scheduler.total_steps == 7
    assert (tmp_path / "checkpoint-4" / "sparse_delta_scheduler.pt").exists()
    after = _deltas(model)
    assert any(not torch.equal(before[n], after[n]) for n in before if n.endswith(".indices"))
    resumed = _sparse_llama()
    trainer, cb2 = _trainer(resumed, tmp_path, steps=7)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert cb2.scheduler.updates == 2
    got = _deltas(resumed)
    for n in after:
        assert torch.equal(got[n], after[n]), n  # bitwise: the same indices and the same values
    # A resumed run with another length would decay the drop fraction on another schedule.
    trainer, _ = _trainer(_sparse_llama(), tmp_path, steps=9)
    with pytest.raises(ValueError, match="total_steps"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
