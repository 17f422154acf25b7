"""DeepSpec draft checkpoints (dspark.md §1.1, §9): config.json ↔ `DraftConfig`, strict loading, saving.

A checkpoint directory holds `config.json` and `model.safetensors`, or an index with shards. The config
is the target's text config with DeepSpec's fields added: a Qwen3 config with `architectures
["Qwen3DSparkModel"]`, or a Gemma 4 `gemma4_text` config (the target's `text_config`, `num_hidden_layers` =
draft layers, every layer `full_attention`) with `architectures ["Gemma4DSparkModel"]`, for DSpark and
DFlash alike. Tensor names are the draft's own `state_dict` names, without a `model.` prefix;
rotary tables are not stored. Loading is strict: missing, unexpected and mis-shaped tensors are all
reported by name before anything is copied, except that `embed_tokens` / `lm_head` may come from
the target when the checkpoint lacks them. Only safetensors are read; nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dspark.config import DraftConfig
from dspark.draft.deepspec import DraftModel
from dspark.checkpoint.reader import config_path, load_state_strictly, raw_config, read_sts

# DraftConfig.kind → the `architectures` entry DeepSpec writes for that layout.
ARCHITECTURES = {"qwen3": "Qwen3DSparkModel", "gemma4": "Gemma4DSparkModel"}
_SHARED = ("embed_tokens.weight", "lm_head.weight")
# Qwen3Config defaults (transformers) for fields a DeepSpec config.json may omit.
_QWEN3_DEFAULTS = dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768)
GEMMA4_MODEL_TYPES = ("gemma4_text", "gemma4_unified_text")  # what DeepSpec's build_draft_config accepts
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
             "block_size", "mask_token_id", "target_layer_ids", "num_target_layers")


def layout_fields(kind: str, hidden_size: int) -> dict:
    """The DraftConfig fields a layout fixes (DeepSpec's modules hard-code them; config.json never states them)."""
    if kind == "qwen3":
        return dict(attention_scale=None, value_norm=False, sandwich_norms=False, embed_scale=1.0)
    # Gemma4DSparkModel: attention scaling 1.0, v_norm, the four-norm layer, Gemma's sqrt(d) embedding scale.
    return dict(attention_scale=1.0, value_norm=True, sandwich_norms=True, embed_scale=float(hidden_size) ** 0.5)


def layout_kind(d, architectures: dict[str, str], required, what: str) -> str:
    """The layout ("qwen3" / "gemma4") a DeepSpec config dict names in `architectures` (kind → class name), after
    checking it is a dict naming exactly one of them and holding every `required` field."""
    if not isinstance(d, dict):
        raise ValueError(f"config must be a dict, got {type(d).__name__}")
    arch = d.get("architectures")
    kinds = [kind for kind, name in architectures.items() if isinstance(arch, list) and name in arch]
    if len(kinds) != 1:
        raise ValueError(f"architectures {arch!r} is not {what} (expected one of "
                         f"{[[name] for name in architectures.values()]})")
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise ValueError(f"config lacks {missing}")
    return kinds[0]


def check_expressible(cfg, architecture: str) -> None:
    """Refuse a draft config (DraftConfig or Eagle3Config) whose layout fields its DeepSpec layout fixes otherwise."""
    fixed = layout_fields(cfg.kind, cfg.hidden_size)
    if cfg.kind == "qwen3":
        fixed.update(hidden_act="silu", rope_fraction=1.0, k_eq_v=False, logit_softcap=None)
    wrong = {k: getattr(cfg, k) for k, want in fixed.items() if getattr(cfg, k) != want}
    if wrong:
        raise ValueError(f"a {architecture} config cannot express {wrong} (the layout fixes {fixed})")


def backbone_fields(cfg) -> dict:
    """The HF backbone fields DeepSpec writes for a draft config of either layout (DraftConfig or Eagle3Config)."""
    if cfg.kind == "qwen3":
        return dict(model_type="qwen3", hidden_act="silu", num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                    rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"}, use_sliding_window=False)
    # The target's sliding-layer head_dim / num_key_value_heads are unknown here: the draft's own stand in.
    return dict(model_type="gemma4_text", hidden_activation=cfg.hidden_act, global_head_dim=cfg.head_dim,
                head_dim=cfg.head_dim, attention_k_eq_v=cfg.k_eq_v, num_key_value_heads=cfg.num_kv_heads,
                num_global_key_value_heads=cfg.num_kv_heads, final_logit_softcapping=cfg.logit_softcap,
                rope_parameters={"full_attention": {"rope_type": "proportional", "rope_theta": cfg.rope_theta,
                                                    "partial_rotary_factor": cfg.rope_fraction}},
                enable_moe_block=False, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
                use_double_wide_mlp=False)


def draft_config_from_dict(d: dict) -> DraftConfig:
    """Translate a DeepSpec draft config.json dict (Qwen3 or Gemma 4 fields + DeepSpec fields) into a `DraftConfig`."""
    kind = layout_kind(d, ARCHITECTURES, _REQUIRED, "a DeepSpec DSpark/DFlash draft")
    backbone = qwen3_backbone(d) if kind == "qwen3" else gemma4_backbone(d)
    taps = d["target_layer_ids"]
    if not isinstance(taps, list):
        raise ValueError(f"target_layer_ids must be a list, got {taps!r}")
    rank = d.get("markov_rank") or 0
    confidence = bool(d.get("enable_confidence_head", False))
    return DraftConfig(
        kind=kind, **backbone, **layout_fields(kind, d["hidden_size"]),
        hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
        intermediate_size=d["intermediate_size"], vocab_size=d["vocab_size"], block_size=d["block_size"],
        mask_token_id=d["mask_token_id"], target_layer_ids=tuple(taps), num_target_layers=d["num_target_layers"],
        target_hidden_size=d.get("target_hidden_size", d["hidden_size"]),
        markov_rank=rank, markov_head_type=d.get("markov_head_type") or "vanilla",
        has_confidence_head=confidence,
        confidence_with_markov=bool(d.get("confidence_head_with_markov", rank > 0)) if confidence else False,
        confidence_bias=bool(d.get("confidence_head_bias", True)),
    )


def _refuse_unsupported(d: dict, fixed: tuple[tuple[str, object], ...], layout: str) -> None:
    for key, want in fixed:
        if d.get(key, want) != want:
            raise ValueError(f"{key} = {d[key]!r} is not supported by the {layout} draft layout (only {want!r})")
    layer_types = d.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"layer_types {layer_types!r}: only full_attention layers are supported")


def qwen3_backbone(d: dict) -> dict:
    """Qwen3DSparkModel's backbone fields of a config.json dict."""
    if d.get("model_type", "qwen3") != "qwen3":
        raise ValueError(f"model_type {d.get('model_type')!r}: a Qwen3DSparkModel draft takes only Qwen3-style "
                         "configs (model_type 'qwen3')")
    _refuse_unsupported(d, (("hidden_act", "silu"), ("attention_bias", False), ("use_sliding_window", False),
                            ("tie_word_embeddings", False)), "DeepSpec Qwen3")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"rope_parameters must be a dict, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default')")
    theta = rope.get("rope_theta", d.get("rope_theta", _QWEN3_DEFAULTS["rope_theta"]))
    heads = d["num_attention_heads"]
    return dict(num_kv_heads=d.get("num_key_value_heads") or heads,
                head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                rms_norm_eps=float(d.get("rms_norm_eps", _QWEN3_DEFAULTS["rms_norm_eps"])), rope_theta=float(theta),
                max_position_embeddings=d.get("max_position_embeddings", _QWEN3_DEFAULTS["max_position_embeddings"]))


def gemma4_backbone(d: dict) -> dict:
    """Gemma4DSparkModel's backbone fields of a config.json dict (DeepSpec's gemma4/config.py build_draft_config:
    the target's text config with the draft's layer count; transformers 5.10.2 field names)."""
    if d.get("model_type") not in GEMMA4_MODEL_TYPES:
        raise ValueError(f"model_type {d.get('model_type')!r}: a Gemma4DSparkModel config has model_type in "
                         f"{GEMMA4_MODEL_TYPES}")
    missing = [k for k in ("global_head_dim", "rope_parameters") if d.get(k) is None]
    if missing:
        raise ValueError(f"config lacks {missing}")
    _refuse_unsupported(d, (("attention_bias", False), ("enable_moe_block", False), ("hidden_size_per_layer_input", 0),
                            ("tie_word_embeddings", False)), "DeepSpec Gemma 4")
    layers, shared = d["num_hidden_layers"], d.get("num_kv_shared_layers") or 0
    if d.get("use_double_wide_mlp") and 0 < layers - shared < layers:
        # Gemma4TextMLP doubles the width of draft layers >= num_hidden_layers - num_kv_shared_layers.
        raise ValueError(f"use_double_wide_mlp with num_kv_shared_layers {shared} widens some of the {layers} draft "
                         "MLPs: not supported")
    act = d.get("hidden_activation", "gelu_pytorch_tanh")
    k_eq_v = bool(d.get("attention_k_eq_v", False))
    kv_key = "num_global_key_value_heads" if k_eq_v else "num_key_value_heads"
    if d.get(kv_key) is None:
        raise ValueError(f"config lacks {kv_key!r} (attention_k_eq_v = {k_eq_v})")
    rope = d["rope_parameters"].get("full_attention") if isinstance(d["rope_parameters"], dict) else None
    if not isinstance(rope, dict) or "rope_theta" not in rope:
        raise ValueError(f"rope_parameters {d['rope_parameters']!r} lacks a full_attention entry with rope_theta")
    rope_type, hd = rope.get("rope_type", "default"), d["global_head_dim"]
    # HF's default rope reads `head_dim` (the sliding layers'), so it only fits heads of global_head_dim if equal.
    if not (rope_type == "proportional" or (rope_type == "default" and d.get("head_dim") == hd)):
        raise ValueError(f"rope_parameters.full_attention.rope_type {rope_type!r} is not supported (only "
                         f"'proportional', or 'default' with head_dim == global_head_dim {hd})")
    if rope.get("factor", 1.0) != 1.0:
        raise ValueError(f"rope_parameters.full_attention.factor {rope['factor']!r} is not supported (only 1.0)")
    cap = d.get("final_logit_softcapping")
    return dict(num_kv_heads=d[kv_key], head_dim=hd, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(rope["rope_theta"]), hidden_act=act,
                rope_fraction=float(rope.get("partial_rotary_factor", 1.0)) if rope_type == "proportional" else 1.0,
                k_eq_v=k_eq_v, logit_softcap=None if cap is None else float(cap),
                max_position_embeddings=d.get("max_position_embeddings", 131072))


def draft_config_to_dict(cfg: DraftConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """A DeepSpec-style config.json dict for `cfg` (`draft_config_from_dict` inverts it)."""
    check_expressible(cfg, ARCHITECTURES[cfg.kind])
    d = {
        "architectures": [ARCHITECTURES[cfg.kind]], "attention_bias": False, "attention_dropout": 0.0,
        "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size, "layer_types": ["full_attention"] * cfg.num_layers,
        "tie_word_embeddings": False, "dtype": str(dtype).removeprefix("torch."),
    }
    d.update(backbone_fields(cfg))
    d.update({
        "block_size": cfg.block_size, "mask_token_id": cfg.mask_token_id,
        "target_layer_ids": list(cfg.target_layer_ids), "num_target_layers": cfg.num_target_layers,
        "markov_rank": cfg.markov_rank, "enable_confidence_head": cfg.has_confidence_head,
    })
    if cfg.markov_rank > 0:
        d["markov_head_type"] = cfg.markov_head_type
    if cfg.has_confidence_head:
        d["confidence_head_with_markov"] = cfg.confidence_with_markov
    # Our own keys, written only off DeepSpec's fixed choices (its checkpoints never carry them).
    if cfg.target_hidden_size != cfg.hidden_size:
        d["target_hidden_size"] = cfg.target_hidden_size
    if not cfg.confidence_bias:
        d["confidence_head_bias"] = False
    return d


def read_draft_config(path: str | Path) -> DraftConfig:
    """The `DraftConfig` of a draft checkpoint directory (or of the directory holding a .safetensors file)."""
    raw = raw_config(path)
    try:
        return draft_config_from_dict(raw)
    except ValueError as e:
        raise ValueError(f"{config_path(path)}: {e}") from None


def load_deepspec_draft(path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               shared_embed: torch.Tensor | None = None, shared_head: torch.Tensor | None = None,
               kernels: str = "auto") -> DraftModel:
    """Build a `DraftModel` from a DeepSpec draft checkpoint, every tensor cast to `dtype` (bf16 → fp32 is exact).

    `shared_embed` / `shared_head` ([V, d], the target's embedding and LM head) fill `embed_tokens`
    / `lm_head` when the checkpoint lacks them; tensors the checkpoint holds always win. `kernels`:
    `DraftConfig.kernels`.
    """
    config = dataclasses.replace(read_draft_config(path), kernels=kernels)
    model = DraftModel.empty(config, dtype=dtype, device=device)
    load_draft_weights(model, path, shared_embed=shared_embed, shared_head=shared_head)
    model.sts_temperatures = read_sts(path)
    return model


def load_draft_weights(model: DraftModel, path: str | Path, *, shared_embed: torch.Tensor | None = None,
                       shared_head: torch.Tensor | None = None) -> None:
    """Copy a draft checkpoint into `model` in place (casting to its dtypes), strictly.

    The checkpoint's config must describe `model`; missing, unexpected, mis-shaped and non-float
    tensors are all reported by name before anything is copied. See `load_deepspec_draft` for the shared tensors.
    """
    config = read_draft_config(path)
    if config != model.config:
        raise ValueError(f"checkpoint {path} describes {config}, not the model's {model.config}")
    load_state_strictly(model, path, shared=dict(zip(_SHARED, (shared_embed, shared_head))), shared_as="shared",
                        what="draft checkpoint")


def save_deepspec_draft(model: DraftModel, path: str | Path, *, include_shared: bool = True) -> None:
    """Write `config.json` and `model.safetensors` in DeepSpec's layout, in the model's dtypes.

    `include_shared=False` leaves out the frozen copies of the target's embedding and LM head (load
    them back with `shared_embed` / `shared_head`): a shipped draft then holds only its own weights."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if (path / "model.safetensors.index.json").exists():
        raise ValueError(f"{path} holds a sharded checkpoint index, which would shadow the new model.safetensors")
    config = draft_config_to_dict(model.config, dtype=model.embed_tokens.weight.dtype)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: t.detach().contiguous().cpu() for k, t in model.state_dict().items()
               if include_shared or k not in _SHARED}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


