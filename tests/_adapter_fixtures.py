"""Test fixtures (not part of the library): a tiny conversion method and small models.

``test_scale`` wraps a Linear as ``y = base(x) * (1 + scale * mask)`` with a trainable
per-output ``scale`` and a ``mask`` buffer, so conversion, adapter files, merging, Trainer,
DDP, FSDP2 and torch.compile are exercised with real modules independently of the pillars.
"""

import torch
from torch import nn

import slimtune
import slimtune.nn  # noqa: F401  -- the pillar modules, when built
from slimtune import convert


class ScaleAdapter(nn.Module):
    def __init__(self, base: nn.Linear, init: float = 0.0, mask_every: int = 1):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        self.scale = nn.Parameter(torch.full((base.out_features,), float(init), device=w.device, dtype=w.dtype))
        mask = (torch.arange(base.out_features, device=w.device) % int(mask_every) == 0).to(w.dtype)
        self.register_buffer("mask", mask)
        self.merged = False

    def factor(self):
        return 1 + self.scale * self.mask

    def forward(self, x):
        y = self.base(x)
        return y if self.merged else y * self.factor()

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            f = self.factor()
            self.base.weight.mul_(f[:, None])
            if self.base.bias is not None:
                self.base.bias.mul_(f)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            f = self.factor()
            self.base.weight.div_(f[:, None])
            if self.base.bias is not None:
                self.base.bias.div_(f)
            self.merged = False


convert.register_method("test_scale", ScaleAdapter, overwrite=True)


class TinyLM(nn.Module):
    """A small causal-LM-shaped model in plain torch: embedding, two MLP blocks, a tied head."""

    def __init__(self, vocab=32, dim=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(dim, 2 * dim), "down": nn.Linear(2 * dim, dim), "norm": nn.LayerNorm(dim)})
            for _ in range(2)
        )
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b["down"](torch.nn.functional.gelu(b["up"](b["norm"](h))))
        return self.lm_head(h)

    def loss(self, ids):
        logits = self(ids[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train_mse(model, opt, sched, x, target, steps):
    """Full-batch MSE steps of model(x) towards target, the scheduler stepped after the optimizer;
    returns the losses."""
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


# The conversion methods every whole-model test runs: the fixture method and the two pillars.
METHODS = ["test_scale", "lora", "sparse_delta"]


def converted_tiny_lm(method: str, seed=0, **apply_kwargs):
    """A seeded TinyLM converted by ``method`` (one of METHODS); apply_kwargs go to ``test_scale``."""
    torch.manual_seed(seed)
    model = TinyLM()
    if method == "lora":
        slimtune.apply_lora(model, r=4, alpha=8)
    elif method == "sparse_delta":
        slimtune.apply_sparse_delta(model, density=0.1)
    else:
        convert.apply(model, method, **apply_kwargs)
    return model


# Two layers of width 32 (4 heads, MLP 64): the size every tiny Hugging Face model starts from.
_TINY_SIZE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def tiny_llama_config(**overrides):
    """A tiny ``transformers.LlamaConfig`` (2 key/value heads, 64 positions); overrides win."""
    import transformers as tf

    return tf.LlamaConfig(**{**_TINY_SIZE, "num_key_value_heads": 2, "max_position_embeddings": 64, **overrides})


def tiny_bert_config(**overrides):
    """A tiny ``transformers.BertConfig`` without dropout; overrides win."""
    import transformers as tf

    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.BertConfig(**{**_TINY_SIZE, **no_dropout, **overrides})


def tiny_vit_config(**overrides):
    """A tiny ``transformers.ViTConfig`` over 16x16 RGB images in 8x8 patches; overrides win."""
    import transformers as tf

    size = {k: v for k, v in _TINY_SIZE.items() if k != "vocab_size"}
    return tf.ViTConfig(**{**size, "image_size": 16, "patch_size": 8, "num_channels": 3, **overrides})


def tiny_llama():
    """A seeded tiny Llama (MLP 48) in eval mode, the base model of the PEFT checkpoint tests."""
    import transformers as tf

    cfg = tiny_llama_config(intermediate_size=48)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(cfg).eval()


def tiny_classifier(num_labels=2):
    """A seeded tiny BERT sequence classifier."""
    import transformers as tf

    torch.manual_seed(0)
    return tf.BertForSequenceClassification(tiny_bert_config(num_labels=num_labels))


def tiny_hf(kind: str):
    """Small Hugging Face models built from configs (random weights, seeded)."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama":
        return tf.LlamaForCausalLM(tiny_llama_config())
    if kind == "bert":
        return tf.BertForMaskedLM(tiny_bert_config(max_position_embeddings=64))
    if kind == "gpt2":
        no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, **no_dropout)
        return tf.GPT2LMHeadModel(cfg)
    if kind == "vit":
        return tf.ViTForImageClassification(tiny_vit_config(num_labels=3))
    raise ValueError(kind)


class TokenData(torch.utils.data.Dataset):
    """Seeded random token ids whose labels are the ids: a causal-LM data set for transformers.Trainer."""

    def __init__(self, n=16, seq=12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def cpu_training_args(tmp_path, steps, learning_rate=5e-2, **extra):
    """transformers.TrainingArguments for short, seeded, quiet CPU runs with batches of 4."""
    import transformers

    return transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=learning_rate,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        **extra,
    )


def hf_inputs(kind: str, batch=2, seq=8):
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(0, 64, (batch, seq), generator=g)}


def perturb_adapters(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
