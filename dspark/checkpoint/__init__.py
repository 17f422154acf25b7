"""Every file format, one way above the models: config translation, tensor names, the safetensors
reader, FP8 / FP4, and loading / saving of targets and drafts. Models never import this package
(but for the README's `from_pretrained` facades); this package imports the models.

    load_target(dir)              a target, its family from config.json's model_type: DeepSeek-V4 (HF names,
                                  upstream names, sharded FP8 / FP4) or a dense HF snapshot (Qwen3, Llama-3,
                                  Gemma 4 text: dspark.checkpoint.hf)
    load_draft(dir, target)       a draft in any layout, told apart by its config.json: DeepSpec's
                                  `Qwen3DSparkModel` or `Gemma4DSparkModel`, DeepSpec's EAGLE-3
                                  `Qwen3Eagle3Model` or `Gemma4Eagle3Model`, or a V4 -DSpark release's
                                  `mtp.*` stages
    save(model, dir)              any of them, in its own layout
    load_weights(model, dir)      copy a checkpoint into an existing model in place (strict)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dspark.checkpoint.deepspec import (ARCHITECTURES as DEEPSPEC_ARCHITECTURES, load_deepspec_draft,
                                        load_draft_weights, read_draft_config, save_deepspec_draft)
from dspark.checkpoint.eagle3 import is_eagle3_draft, load_eagle3_draft, save_eagle3_draft
from dspark.checkpoint.hf import is_dense_config, load_dense_target
from dspark.checkpoint.reader import CheckpointReader, raw_config, read_sts
from dspark.checkpoint.v4 import (dspark_stage_sources, load_target as load_v4_target, load_v4_draft,
                                  load_weights as load_v4_weights, read_mtp_state, save_target, save_v4_draft)
from dspark.checkpoint.v4_config import config_from_dict, config_to_dict, read_config
from dspark.draft.deepspec import DraftModel
from dspark.draft.eagle3 import Eagle3Draft
from dspark.draft.v4 import V4DSparkDraft
from dspark.model.target import DeepseekV4


def load_target(path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                num_layers: int | None = None, kernels: str = "auto"):
    """A target from a checkpoint directory: a `DenseTarget` when config.json's model_type is a dense HF
    family (qwen3, llama, gemma4_text, gemma4), else a `DeepseekV4`. `num_layers` builds only the first
    layers; `kernels`: the config's `kernels` switch."""
    load = load_dense_target if is_dense_config(raw_config(path)) else load_v4_target
    return load(path, dtype=dtype, device=device, num_layers=num_layers, kernels=kernels)


def _check_draft_fits(path: str | Path, target) -> None:
    """A DeepSpec draft reads the target's taps, embedding and head: its sizes must be the target's."""
    draft, cfg = read_draft_config(path), target.config
    for what, mine, theirs in (("hidden size", draft.target_hidden_size, cfg.hidden_size),
                               ("vocabulary", draft.vocab_size, cfg.vocab_size)):
        if mine != theirs:
            raise ValueError(f"draft {path} was built for a target {what} of {mine}; the target "
                             f"({type(target).__name__}) has {theirs}")
    if max(draft.target_layer_ids) >= cfg.num_layers:
        raise ValueError(f"draft {path} taps target layers {list(draft.target_layer_ids)}; the target "
                         f"({type(target).__name__}) has {cfg.num_layers} layers")


def is_deepspec_draft(path: str | Path) -> bool:
    """Whether the checkpoint directory holds a DeepSpec-layout DSpark / DFlash draft (Qwen3 or Gemma 4)."""
    arch = raw_config(path).get("architectures") or ()
    return any(name in arch for name in DEEPSPEC_ARCHITECTURES.values())


def load_draft(path: str | Path, target: DeepseekV4 | None = None, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", kernels: str = "auto"):
    """A draft in either layout. A DeepSpec draft may leave out its frozen copies of the target's
    embedding and LM head (shipped drafts do): they then come from `target`. A V4-layout draft is
    attached to `target` (it reads the target's embedding and head)."""
    if is_deepspec_draft(path):
        if target is not None:
            _check_draft_fits(path, target)
        shared = {} if target is None else dict(shared_embed=target.model.embed_tokens.weight.detach(),
                                                shared_head=target.lm_head.weight.detach())
        return load_deepspec_draft(path, dtype=dtype, device=device, kernels=kernels, **shared)
    if is_eagle3_draft(path):  # plain-PyTorch draft: no kernels switch
        return load_eagle3_draft(path, target, dtype=dtype, device=device)
    return load_v4_draft(path, target, dtype=dtype, device=device, kernels=kernels)


def save(model: nn.Module, path: str | Path) -> None:
    """Write a target or a draft in its own layout."""
    if isinstance(model, DeepseekV4):
        save_target(model, path)
    elif isinstance(model, DraftModel):
        save_deepspec_draft(model, path)
    elif isinstance(model, Eagle3Draft):
        save_eagle3_draft(model, path)
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
           "load_dense_target", "load_draft", "load_target", "load_v4_draft", "load_v4_target", "load_weights",
           "read_config", "read_draft_config", "read_mtp_state", "read_sts", "save", "save_deepspec_draft",
           "save_target", "save_v4_draft"]
