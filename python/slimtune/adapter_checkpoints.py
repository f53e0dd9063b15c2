"""``AdapterCheckpointCallback``: Trainer checkpoints of a slimtune model hold its adapters, not the model.

``transformers.Trainer`` writes ``model.safetensors`` with every weight of a model it does not
know (91 MB for MiniLM where the adapters are a few hundred kB). After each checkpoint the callback
replaces that file by ``adapter_model.safetensors``: the converted layers' adapter tensors and the
modules to save, under their state-dict names. Resuming from ``output_dir/checkpoint-<step>`` loads
them back into the (same, freshly converted) model; the Trainer restores optimizer, scheduler and
RNG state itself.
"""

import os

import torch
from transformers import TrainerCallback

from . import convert as _cv
from . import heads as _heads

WEIGHTS_NAME = "adapter_model.safetensors"
FULL_WEIGHTS_NAME = "model.safetensors"


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
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(folder, WEIGHTS_NAME))
        full = os.path.join(folder, FULL_WEIGHTS_NAME)
        if os.path.exists(full):
            os.remove(full)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 or model is None:
            return
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", WEIGHTS_NAME)
        if not os.path.exists(path):
            if os.path.exists(os.path.join(os.path.dirname(path), FULL_WEIGHTS_NAME)):
                return  # a full checkpoint, which the Trainer has loaded itself
            raise FileNotFoundError(
                f"AdapterCheckpointCallback: resuming at step {state.global_step} but {path} is missing "
                f"(resume from a checkpoint inside output_dir)"
            )
        from safetensors.torch import load_file

        saved = load_file(path)
        expected = adapter_state_dict(model)
        if set(saved) != set(expected):
            diff = sorted(set(saved) ^ set(expected))
            raise ValueError(
                f"AdapterCheckpointCallback: {path} does not match the model's adapters (e.g. {diff[0]!r})"
            )
        with torch.no_grad():
            for k, v in expected.items():
                v.copy_(saved[k])
