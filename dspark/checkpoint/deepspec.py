"""DeepSpec draft checkpoints (dspark.md §1.1, §9): config.json ↔ `DraftConfig`, strict loading, saving.

A checkpoint directory holds `config.json` (the target's Qwen3 config with DeepSpec's fields added,
`architectures ["Qwen3DSparkModel"]` for DSpark and DFlash alike) and `model.safetensors`, or an
index with shards. Tensor names are the draft's own `state_dict` names, without a `model.` prefix;
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
from dspark.checkpoint.reader import CheckpointReader, config_path, listing, raw_config, read_sts

ARCHITECTURE = "Qwen3DSparkModel"
_SHARED = ("embed_tokens.weight", "lm_head.weight")
# Qwen3Config defaults (transformers) for fields a DeepSpec config.json may omit.
_QWEN3_DEFAULTS = dict(rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768)


def draft_config_from_dict(d: dict) -> DraftConfig:
    """Translate a DeepSpec draft config.json dict (Qwen3 fields + DeepSpec fields) into a `DraftConfig`."""
    if not isinstance(d, dict):
        raise ValueError(f"config must be a dict, got {type(d).__name__}")
    arch = d.get("architectures")
    if not isinstance(arch, list) or ARCHITECTURE not in arch:
        raise ValueError(f"architectures {arch!r} is not a DeepSpec DSpark/DFlash draft (expected [{ARCHITECTURE!r}])")
    if d.get("model_type", "qwen3") != "qwen3":
        raise ValueError(f"model_type {d.get('model_type')!r}: only Qwen3-style drafts are supported")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                "block_size", "mask_token_id", "target_layer_ids", "num_target_layers")
    missing = [k for k in required if d.get(k) is None]
    if missing:
        raise ValueError(f"config lacks {missing}")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("use_sliding_window", False),
                      ("tie_word_embeddings", False)):
        if d.get(key, want) != want:
            raise ValueError(f"{key} = {d[key]!r} is not supported by the DeepSpec draft layout (only {want!r})")
    layer_types = d.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"layer_types {layer_types!r}: only full_attention layers are supported")

    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"rope_parameters must be a dict, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default')")
    theta = rope.get("rope_theta", d.get("rope_theta", _QWEN3_DEFAULTS["rope_theta"]))

    taps = d["target_layer_ids"]
    if not isinstance(taps, list):
        raise ValueError(f"target_layer_ids must be a list, got {taps!r}")
    rank = d.get("markov_rank") or 0
    confidence = bool(d.get("enable_confidence_head", False))
    heads = d["num_attention_heads"]
    return DraftConfig(
        kind="qwen3", hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"], num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads, intermediate_size=d["intermediate_size"],
        rms_norm_eps=float(d.get("rms_norm_eps", _QWEN3_DEFAULTS["rms_norm_eps"])), rope_theta=float(theta),
        vocab_size=d["vocab_size"], block_size=d["block_size"], mask_token_id=d["mask_token_id"],
        target_layer_ids=tuple(taps), num_target_layers=d["num_target_layers"],
        target_hidden_size=d.get("target_hidden_size", d["hidden_size"]),
        markov_rank=rank, markov_head_type=d.get("markov_head_type") or "vanilla",
        has_confidence_head=confidence,
        confidence_with_markov=bool(d.get("confidence_head_with_markov", rank > 0)) if confidence else False,
        confidence_bias=bool(d.get("confidence_head_bias", True)),
        max_position_embeddings=d.get("max_position_embeddings", _QWEN3_DEFAULTS["max_position_embeddings"]),
    )


def draft_config_to_dict(cfg: DraftConfig, dtype: torch.dtype = torch.bfloat16) -> dict:
    """A DeepSpec-style config.json dict for `cfg` (`draft_config_from_dict` inverts it)."""
    d = {
        "architectures": [ARCHITECTURE], "model_type": "qwen3", "attention_bias": False, "attention_dropout": 0.0,
        "hidden_act": "silu", "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "max_position_embeddings": cfg.max_position_embeddings, "vocab_size": cfg.vocab_size,
        "layer_types": ["full_attention"] * cfg.num_layers, "use_sliding_window": False,
        "tie_word_embeddings": False, "dtype": str(dtype).removeprefix("torch."),
        "block_size": cfg.block_size, "mask_token_id": cfg.mask_token_id,
        "target_layer_ids": list(cfg.target_layer_ids), "num_target_layers": cfg.num_target_layers,
        "markov_rank": cfg.markov_rank, "enable_confidence_head": cfg.has_confidence_head,
    }
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
    shared = dict(zip(_SHARED, (shared_embed, shared_head)))
    with CheckpointReader(path) as reader:
        state = model.state_dict()
        missing, misshaped, bad = [], [], []
        for name, param in state.items():
            if name in reader:
                shape, ok = reader.shape(name), reader.dtype(name).is_floating_point
                source = name
            elif shared.get(name) is not None:
                shape, ok = tuple(shared[name].shape), shared[name].is_floating_point()
                source = f"shared {name.split('.')[0]}"
            else:
                missing.append(name)
                continue
            if shape != tuple(param.shape):
                misshaped.append(f"{source} {list(shape)} (needs {list(param.shape)})")
            elif not ok:
                bad.append(f"{source} is not floating point")
        unexpected = [k for k in reader.keys() if k not in state]
        errors = [f"{len(v)} {what}: {listing(v)}" for what, v in
                  (("missing tensors", missing), ("unexpected tensors", unexpected),
                   ("mis-shaped tensors", misshaped), ("bad tensors", bad)) if v]
        if errors:
            raise ValueError(f"cannot load draft checkpoint {path}: " + "; ".join(errors))
        with torch.no_grad():
            for name, param in state.items():
                param.copy_(reader.get(name) if name in reader else shared[name])


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


