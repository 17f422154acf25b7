"""Every file format, one way above the models: config translation, tensor names, the safetensors
reader, FP8 / FP4, and loading / saving of targets and drafts. Models never import this package
(but for the README's `from_pretrained` facades); this package imports the models.

    load_target(dir)              a DeepSeek-V4 target (HF names, upstream names, sharded FP8 / FP4)
    load_draft(dir, target)       a draft in either layout, told apart by its config.json:
                                  DeepSpec's `Qwen3DSparkModel` or a V4 -DSpark release's `mtp.*` stages
    save(model, dir)              any of them, in its own layout
    load_weights(model, dir)      copy a checkpoint into an existing model in place (strict)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dspark.checkpoint.deepspec import (ARCHITECTURE as DEEPSPEC_ARCHITECTURE, load_deepspec_draft,
                                        load_draft_weights, read_draft_config, save_deepspec_draft)
from dspark.checkpoint.reader import CheckpointReader, raw_config, read_sts
from dspark.checkpoint.v4 import (dspark_stage_sources, load_target, load_v4_draft, load_weights as load_v4_weights,
                                  read_mtp_state, save_target, save_v4_draft)
from dspark.checkpoint.v4_config import config_from_dict, config_to_dict, read_config
from dspark.draft.deepspec import DraftModel
from dspark.draft.v4 import V4DSparkDraft
from dspark.model.target import DeepseekV4


def is_deepspec_draft(path: str | Path) -> bool:
    """Whether the checkpoint directory holds a DeepSpec-layout draft (else: a V4 release)."""
    return DEEPSPEC_ARCHITECTURE in (raw_config(path).get("architectures") or ())


def load_draft(path: str | Path, target: DeepseekV4 | None = None, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", kernels: str = "auto"):
    """A draft in either layout. A DeepSpec draft may leave out its frozen copies of the target's
    embedding and LM head (shipped drafts do): they then come from `target`. A V4-layout draft is
    attached to `target` (it reads the target's embedding and head)."""
    if is_deepspec_draft(path):
        shared = {} if target is None else dict(shared_embed=target.model.embed_tokens.weight.detach(),
                                                shared_head=target.lm_head.weight.detach())
        return load_deepspec_draft(path, dtype=dtype, device=device, kernels=kernels, **shared)
    return load_v4_draft(path, target, dtype=dtype, device=device, kernels=kernels)


def save(model: nn.Module, path: str | Path) -> None:
    """Write a target or a draft in its own layout."""
    if isinstance(model, DeepseekV4):
        save_target(model, path)
    elif isinstance(model, DraftModel):
        save_deepspec_draft(model, path)
    elif isinstance(model, V4DSparkDraft):
        save_v4_draft(model, path)
    else:
        raise TypeError(f"no checkpoint format for {type(model).__name__}")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Copy a checkpoint of `model`'s own architecture into it in place (strict; e.g. to resume)."""
    if isinstance(model, DeepseekV4):
        load_v4_weights(model, path, load_mtp=model.has_mtp)
    elif isinstance(model, DraftModel):
        load_draft_weights(model, path)
    elif isinstance(model, V4DSparkDraft):
        stages = len(model.stages)
        load_v4_weights(model, path, sources=lambda name, shape: dspark_stage_sources(name, shape, stages))
    else:
        raise TypeError(f"no checkpoint format for {type(model).__name__}")


__all__ = ["CheckpointReader", "config_from_dict", "config_to_dict", "is_deepspec_draft", "load_deepspec_draft",
           "load_draft", "load_target", "load_v4_draft", "load_weights", "read_config", "read_draft_config",
           "read_mtp_state", "read_sts", "save", "save_deepspec_draft", "save_target", "save_v4_draft"]
