"""``AdapterCheckpointCallback``: Trainer checkpoints of a slimtune model hold its adapters, not the model.

``transformers.Trainer`` writes every weight of a model it does not know into each checkpoint's
``model.safetensors`` (91 MB for MiniLM where the adapters are a few hundred kB). After each
checkpoint the callback rewrites that file with the converted layers' adapter tensors and the
modules to save only, under their state-dict names. Resuming, the Trainer loads it into the
(freshly converted) model with ``load_state_dict(strict=False)``: the frozen weights it leaves out
are the ones the model already has; optimizer, scheduler and RNG state are the Trainer's own files.
"""

import os

import torch
from transformers import TrainerCallback

from . import convert as _cv
from . import heads as _heads
from ._atomic import default_mode

WEIGHTS_NAME = "model.safetensors"


def adapter_state_dict(model: torch.nn.Module) -> dict:
    """The entries of ``model.state_dict()`` that are adapter tensors or belong to modules to save."""
    inner = _cv._unwrap(model)
    own = {id(t) for m in _cv.converted_modules(inner).values() for t in _cv.adapter_state(m).values()}
    own |= {id(t) for m in _heads.saved_modules(inner).values() for t in m.state_dict(keep_vars=True).values()}
    if not own:
        raise ValueError("AdapterCheckpointCallback: the model has no converted layers and no modules to save")
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) in own}


class AdapterCheckpointCallback(TrainerCallback):
    """``Trainer(..., callbacks=[slimtune.AdapterCheckpointCallback()])``: checkpoints of adapters only."""

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if model is None or not os.path.isdir(folder) or not state.is_world_process_zero:
            return
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state_dict(model).items()}
        tmp = os.path.join(folder, f".{WEIGHTS_NAME}.tmp")
        save_file(tensors, tmp, metadata={"format": "pt", "content": "slimtune adapters"})
        os.chmod(tmp, default_mode(directory=False))
        os.replace(tmp, os.path.join(folder, WEIGHTS_NAME))
