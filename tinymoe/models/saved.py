"""A model that `tinymoe train` saved: rebuilt from the name and config in its checkpoint."""
from __future__ import annotations

import os

from ..checkpoint import load_checkpoint


def load_model(checkpoint_path, device: str = "cpu"):
    """The model saved by `train` in a checkpoint (the file, or the run folder that holds
    it), rebuilt from its config, in eval mode."""
    if os.path.isdir(checkpoint_path):                 # a run folder: its checkpoint
        checkpoint_path = os.path.join(checkpoint_path, "ckpt.safetensors")
    info = load_checkpoint(checkpoint_path, restore_rng=False, map_device=device)
    name = (info["extra"] or {}).get("model_name")
    if name is None:
        raise ValueError(f"load_model: {checkpoint_path} was not written by tinymoe.train "
                         f"(no model name in its metadata)")
    from . import build_model

    model = build_model(name, **info["config"]).to(device)
    model.load_state_dict(info["model_state"])
    return model.eval()
