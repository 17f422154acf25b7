"""DeepSpec EAGLE-3 draft checkpoints (the released `deepseek-ai/eagle3_*_ttt7` drafts): config.json ↔
`Eagle3Config`, strict loading, saving.

A checkpoint directory holds `config.json` — the target's (text) config with DeepSpec's fields added
(deepspec/modeling/eagle3/{qwen3,gemma4}/config.py): `architectures ["Qwen3Eagle3Model"]` on a Qwen3
config, or `["Gemma4Eagle3Model"]` on the target's `gemma4_text` config (one `full_attention` layer),
with `target_layer_ids`, `num_target_layers`, `ttt_length`, `draft_num_hidden_layers` (= `num_hidden_layers`),
`step_loss_decay` — and `model.safetensors` (or an index with shards) written by `save_pretrained`
of the draft's own state_dict: `embed_tokens`, `fc`, `layers.0.*` (Gemma 4: with the feed-forward norms
and the `layer_scalar` buffer, no v_proj when `attention_k_eq_v`), `norm`, `lm_head`, no prefix, no
rotary tables. `embed_tokens` / `lm_head` are frozen copies of the target's; a checkpoint without them
takes them from the target. Loading is strict and reads safetensors only. The backbone fields are read
as for DeepSpec's DSpark drafts of the same family (dspark.checkpoint.deepspec).

Refused by name: more than one draft layer (DeepSpec's evaluator refuses it too: the committed rows'
K/V would depend on each other) and SpecForge's draft-vocabulary maps (`d2t` / `t2d`, which
DeepSpec's layout does not have).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dspark.checkpoint.deepspec import (GEMMA4_MODEL_TYPES, backbone_fields, check_expressible, gemma4_backbone,
                                        layout_fields, layout_kind, qwen3_backbone)
from dspark.checkpoint.reader import config_path, load_state_strictly, raw_config
from dspark.config import Eagle3Config
from dspark.draft.eagle3 import Eagle3Draft

# Eagle3Config.kind → the `architectures` entry DeepSpec writes for that layout.
ARCHITECTURES = {"qwen3": "Qwen3Eagle3Model", "gemma4": "Gemma4Eagle3Model"}
_SHARED = ("embed_tokens.weight", "lm_head.weight")
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
             "target_layer_ids", "num_target_layers", "ttt_length")


def is_eagle3_draft(path: str | Path) -> bool:
    """Whether the checkpoint directory holds a DeepSpec EAGLE-3 draft (Qwen3 or Gemma 4 layout)."""
    arch = raw_config(path).get("architectures") or ()
    return any(name in arch for name in ARCHITECTURES.values())


def eagle3_config_from_dict(d: dict) -> Eagle3Config:
    """Translate a DeepSpec EAGLE-3 config.json dict (Qwen3 or Gemma 4 fields + DeepSpec's) into an `Eagle3Config`."""
    kind = layout_kind(d, ARCHITECTURES, _REQUIRED, "a DeepSpec EAGLE-3 draft")
    if d["num_hidden_layers"] != 1 or d.get("draft_num_hidden_layers", 1) != 1:
        raise ValueError(f"num_hidden_layers {d['num_hidden_layers']} (draft_num_hidden_layers "
                         f"{d.get('draft_num_hidden_layers')}): only single-layer EAGLE-3 drafts are supported, as "
                         f"in DeepSpec's evaluator")
    model_types = ("qwen3",) if kind == "qwen3" else GEMMA4_MODEL_TYPES
    if d.get("model_type", "qwen3" if kind == "qwen3" else None) not in model_types:
        raise ValueError(f"model_type {d.get('model_type')!r}: a {ARCHITECTURES[kind]} config has model_type in "
                         f"{model_types}")
    backbone = qwen3_backbone(d) if kind == "qwen3" else gemma4_backbone(d)
    taps = d["target_layer_ids"]
    if not isinstance(taps, list):
        raise ValueError(f"target_layer_ids must be a list, got {taps!r}")
    layout = layout_fields(kind, d["hidden_size"])
    return Eagle3Config(
        kind=kind, **backbone, attention_scale=layout["attention_scale"], value_norm=layout["value_norm"],
        sandwich_norms=layout["sandwich_norms"], embed_scale=layout["embed_scale"],
        hidden_size=d["hidden_size"], num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
        vocab_size=d["vocab_size"], target_layer_ids=tuple(taps), num_target_layers=d["num_target_layers"],
        ttt_length=d["ttt_length"])


def eagle3_config_to_dict(cfg: Eagle3Config, dtype: torch.dtype = torch.bfloat16) -> dict:
    """A DeepSpec-style config.json dict for `cfg` (`eagle3_config_from_dict` inverts it)."""
    check_expressible(cfg, ARCHITECTURES[cfg.kind])
    d = {
        "architectures": [ARCHITECTURES[cfg.kind]], "attention_bias": False, "attention_dropout": 0.0,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": 1, "draft_num_hidden_layers": 1,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size, "layer_types": ["full_attention"], "tie_word_embeddings": False,
        "dtype": str(dtype).removeprefix("torch."), "target_layer_ids": list(cfg.target_layer_ids),
        "num_target_layers": cfg.num_target_layers, "ttt_length": cfg.ttt_length,
    }
    d.update(backbone_fields(cfg))
    return d


def read_eagle3_config(path: str | Path) -> Eagle3Config:
    """The `Eagle3Config` of a checkpoint directory (or of the directory holding a .safetensors file)."""
    try:
        return eagle3_config_from_dict(raw_config(path))
    except ValueError as e:
        raise ValueError(f"{config_path(path)}: {e}") from None


def load_eagle3_draft(path: str | Path, target=None, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> Eagle3Draft:
    """Build an `Eagle3Draft` from a DeepSpec EAGLE-3 checkpoint, every tensor cast to `dtype`.

    With `target` (any Target), the draft is checked against it (hidden size, vocabulary, tap depth)
    and the target's embedding / LM head fill `embed_tokens` / `lm_head` if the checkpoint lacks them
    (tensors the checkpoint holds always win). Missing, unexpected, mis-shaped and non-float tensors
    are all reported by name before anything is copied."""
    model = Eagle3Draft.empty(read_eagle3_config(path), dtype=dtype, device=device)
    shared = {}
    if target is not None:
        try:
            model.check_target(target.config)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        shared = dict(zip(_SHARED, (target.model.embed_tokens.weight.detach(), target.lm_head.weight.detach())))
    load_state_strictly(model, path, shared=shared, shared_as="the target's", what="EAGLE-3 draft checkpoint")
    return model.eval()


def save_eagle3_draft(model: Eagle3Draft, path: str | Path, *, include_shared: bool = True) -> None:
    """Write `config.json` and `model.safetensors` in DeepSpec's layout, in the model's dtypes.

    `include_shared=False` leaves out the frozen copies of the target's embedding and LM head (they then
    come from the target when loaded)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if (path / "model.safetensors.index.json").exists():
        raise ValueError(f"{path} holds a sharded checkpoint index, which would shadow the new model.safetensors")
    config = eagle3_config_to_dict(model.config, dtype=model.embed_tokens.weight.dtype)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: t.detach().contiguous().cpu() for k, t in model.state_dict().items()
               if include_shared or k not in _SHARED}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


__all__ = ["ARCHITECTURES", "eagle3_config_from_dict", "eagle3_config_to_dict", "is_eagle3_draft", "load_eagle3_draft",
           "read_eagle3_config", "save_eagle3_draft"]
