"""Dense HF snapshot directories (Qwen3, Llama-3, Gemma 4 text) → `DenseTarget`.

A snapshot is config.json (+ generation_config.json) and model.safetensors or a sharded set behind
model.safetensors.index.json, in HF's in-memory tensor names. config.json's `model_type` picks the
family: "qwen3", "llama", "gemma4_text", or "gemma4" (the multimodal wrapper: its `text_config`, the
weights under `model.language_model.`, the vision / audio towers ignored). Every field dspark does not
implement is refused by name in one line (rope types, Gemma 4's per-layer input embeddings, KV sharing,
MoE blocks, bidirectional attention, ...), never silently dropped. Missing, unexpected or mis-shaped
tensors are refused by name before any memory is taken.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dspark.checkpoint.reader import CheckpointReader, config_path, listing, raw_config
from dspark.config import DenseConfig, DenseRope
from dspark.model.dense import DenseTarget

MODEL_TYPES = ("qwen3", "llama", "gemma4_text", "gemma4")
_FAMILY = {"qwen3": "qwen3", "llama": "llama", "gemma4_text": "gemma4"}
_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}
# Where the multimodal Gemma 4 keeps its text model, and the towers a text target never reads.
_GEMMA4_TEXT_PREFIX = "model.language_model."
_GEMMA4_IGNORED = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
_GEMMA4_DEFAULT_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                           "rope_theta": 1_000_000.0}}


def is_dense_config(raw: dict) -> bool:
    """Whether a config.json names a dense HF family this module reads."""
    return raw.get("model_type") in MODEL_TYPES


def _rope(p: dict, where: str) -> DenseRope:
    if not isinstance(p, dict):
        raise ValueError(f"{where} must be a dict, got {p!r}")
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ("default", "llama3", "proportional"):
        raise ValueError(f"{where}.rope_type {kind!r} is not implemented (dspark: default, llama3, proportional)")
    if "theta" not in p and "rope_theta" not in p:
        raise ValueError(f"{where} has no rope_theta")
    prf = p.get("partial_rotary_factor", 1.0)
    if kind != "proportional" and prf != 1.0:
        raise ValueError(f"{where}.partial_rotary_factor {prf} is only implemented for rope_type 'proportional'")
    kw = dict(theta=p.get("rope_theta", p.get("theta")), kind=kind, partial_rotary_factor=prf,
              factor=p.get("factor", 1.0))
    if kind == "llama3":
        kw.update(low_freq_factor=p["low_freq_factor"], high_freq_factor=p["high_freq_factor"],
                  original_max_position=p["original_max_position_embeddings"])
    return DenseRope(**kw)


def _default_layer_types(c: dict, family: str, n: int) -> list[str]:
    """HF's layer_types when config.json leaves them out (its __post_init__ rules per family)."""
    if family == "gemma4":  # five sliding layers to one full one
        return ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n)]
    if family == "qwen3" and c.get("use_sliding_window") and c.get("sliding_window") is not None:
        first = c.get("max_window_layers", 28)
        return ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    return ["full_attention"] * n


def _rope_parameters(c: dict) -> dict:
    """HF 5's rope_parameters, or the legacy rope_theta + rope_scaling spelling."""
    if c.get("rope_parameters") is not None:
        return c["rope_parameters"]
    return {"rope_theta": c.get("rope_theta", 10000.0), **(c.get("rope_scaling") or {})}


def _refuse(c: dict, file: Path, name: str, ok) -> None:
    if name in c and not ok(c[name]):
        raise ValueError(f"{file}: {name}={c[name]!r} is not implemented by dspark's dense targets")


def dense_config_from_dict(raw: dict, generation: dict | None = None, file: Path | str = "config.json"
                           ) -> tuple[DenseConfig, str]:
    """config.json (and generation_config.json) → (DenseConfig, the checkpoint's tensor-name prefix of
    `model.`): "model." for the text models, "model.language_model." for the multimodal Gemma 4."""
    file = Path(file)
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{file}: model_type {model_type!r} is not a dense family dspark reads ({MODEL_TYPES})")
    prefix = "model."
    c = raw
    if model_type == "gemma4":
        c = raw.get("text_config")
        if not isinstance(c, dict):
            raise ValueError(f"{file}: a gemma4 config needs a text_config dict")
        c = {"model_type": "gemma4_text", **c}
        if c["model_type"] != "gemma4_text":
            raise ValueError(f"{file}: text_config.model_type {c['model_type']!r} is not gemma4_text")
        # The wrapper's own tie / token fields win over the text config's defaults.
        c.update({k: raw[k] for k in ("tie_word_embeddings", "eos_token_id", "bos_token_id") if k in raw})
        prefix, model_type = _GEMMA4_TEXT_PREFIX, "gemma4_text"
    family = _FAMILY[model_type]
    _refuse(raw, file, "quantization_config", lambda v: not v)
    _refuse(c, file, "quantization_config", lambda v: not v)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(c.get(name), int):
            raise ValueError(f"{file}: {name} must be an int, got {c.get(name)!r}")
    n = c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    kw = dict(family=family, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
              intermediate_size=c["intermediate_size"], num_layers=n, num_heads=heads,
              num_kv_heads=c.get("num_key_value_heads") or heads,
              head_dim=c.get("head_dim") or c["hidden_size"] // heads,
              max_position_embeddings=c.get("max_position_embeddings", 2048),
              rms_norm_eps=c.get("rms_norm_eps", 1e-6), attention_bias=bool(c.get("attention_bias", False)),
              tie_word_embeddings=bool(c.get("tie_word_embeddings", family == "gemma4")),
              bos_token_id=c.get("bos_token_id"))
    layer_types = c.get("layer_types") or _default_layer_types(c, family, n)
    if family == "gemma4" and layer_types[-1] != "full_attention":
        layer_types = [*layer_types[:-1], "full_attention"]  # HF forces Gemma 4's last layer to full attention
    bad = sorted({t for t in layer_types if t not in _LAYER_TYPES})
    if bad:
        raise ValueError(f"{file}: layer_types {bad} are not implemented (dspark: {sorted(_LAYER_TYPES)})")
    if len(layer_types) != n:
        raise ValueError(f"{file}: layer_types has {len(layer_types)} entries for num_hidden_layers {n}")
    kw["layer_types"] = tuple(_LAYER_TYPES[t] for t in layer_types)
    if "sliding" in kw["layer_types"]:
        kw["sliding_window"] = c.get("sliding_window", 512 if family == "gemma4" else None)
    rope = _rope_parameters(c) if family != "gemma4" else c.get("rope_parameters") or _GEMMA4_DEFAULT_ROPE

    if family in ("qwen3", "llama"):
        kw.update(hidden_act=c.get("hidden_act", "silu"), rope=_rope(rope, f"{file}: rope_parameters"))
        _refuse(c, file, "hidden_act", lambda v: v == "silu")
        kw["qk_norm"] = family == "qwen3"
        kw["mlp_bias"] = bool(c.get("mlp_bias", False))
    else:
        # Gemma 4 text: what its config says; the parts dspark does not implement, refused by name.
        _refuse(c, file, "hidden_size_per_layer_input", lambda v: not v)  # per-layer input embeddings
        _refuse(c, file, "num_kv_shared_layers", lambda v: not v)
        _refuse(c, file, "enable_moe_block", lambda v: not v)
        _refuse(c, file, "use_bidirectional_attention", lambda v: v is None)
        _refuse(c, file, "hidden_activation", lambda v: v == "gelu_pytorch_tanh")
        if not isinstance(rope, dict) or set(rope) - {"full_attention", "sliding_attention"}:
            raise ValueError(f"{file}: gemma4 rope_parameters must map full_attention / sliding_attention to "
                             f"rope dicts, got keys {sorted(rope) if isinstance(rope, dict) else rope!r}")
        full = rope.get("full_attention")
        sliding = rope.get("sliding_attention", full)
        kw.update(hidden_act="gelu_pytorch_tanh", qk_norm=True, v_norm=True, sandwich_norms=True,
                  attention_scale=1.0, embed_scale=c["hidden_size"] ** 0.5,
                  final_logit_softcapping=c.get("final_logit_softcapping"),
                  attention_k_eq_v=bool(c.get("attention_k_eq_v", False)),
                  rope=_rope(full, f"{file}: rope_parameters.full_attention"),
                  sliding_rope=_rope(sliding, f"{file}: rope_parameters.sliding_attention"))
        full_layers = {str(i) for i, t in enumerate(kw["layer_types"]) if t == "full"}
        if "per_layer_config" in c:
            overrides = c["per_layer_config"] or {}
        else:  # HF's spelling before it builds per_layer_config (its defaults: a 512-wide global head)
            override = {"head_dim": c.get("global_head_dim", 512)}
            if kw["attention_k_eq_v"] and c.get("num_global_key_value_heads") is not None:
                override["num_key_value_heads"] = c["num_global_key_value_heads"]
            overrides = {i: override for i in full_layers}
        seen = {json.dumps(v, sort_keys=True) for v in overrides.values()}
        if set(overrides) - full_layers or len(seen) > 1 or overrides and set(overrides) != full_layers:
            raise ValueError(f"{file}: per_layer_config must give every full-attention layer the same overrides "
                             f"(layers {sorted(full_layers, key=int)}), got layers {sorted(overrides, key=int)}")
        for override in overrides.values():
            extra = sorted(set(override) - {"head_dim", "num_key_value_heads"})
            if extra:
                raise ValueError(f"{file}: per_layer_config overrides {extra} are not implemented")
            kw["global_head_dim"] = override.get("head_dim")
            kw["global_num_kv_heads"] = override.get("num_key_value_heads")
    eos = (generation or {}).get("eos_token_id", c.get("eos_token_id"))
    kw["eos_token_ids"] = tuple([eos] if isinstance(eos, int) else (eos or ()))
    try:
        return DenseConfig(**kw), prefix
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: {e}") from None


def read_dense_config(path: str | Path) -> tuple[DenseConfig, str]:
    """The DenseConfig of a snapshot directory (config.json + generation_config.json) and its prefix."""
    file = config_path(path)
    generation = file.parent / "generation_config.json"
    gen = None
    if generation.is_file():
        try:
            gen = json.loads(generation.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{generation}: not valid JSON ({e})") from None
    return dense_config_from_dict(raw_config(path), gen, file)


def _checkpoint_names(reader: CheckpointReader, prefix: str) -> dict[str, str]:
    """Model name → checkpoint name of every tensor a text target may read (towers ignored)."""
    names = {}
    for key in reader.keys():
        if key.startswith(_GEMMA4_IGNORED) and prefix == _GEMMA4_TEXT_PREFIX:
            continue
        names["model." + key[len(prefix):] if key.startswith(prefix) else key] = key
    return names


def load_dense_target(path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                      num_layers: int | None = None, kernels: str = "auto") -> DenseTarget:
    """Build a `DenseTarget` from an HF snapshot directory, strictly by tensor name and shape.

    `num_layers` builds only the first layers (the rest of the checkpoint is skipped). A tied head
    (tie_word_embeddings) is the embedding; an untied one must be in the checkpoint."""
    config, prefix = read_dense_config(path)
    config = config.replace(kernels=kernels)
    skipped = ()
    if num_layers is not None and num_layers != config.num_layers:
        skipped = tuple(f"model.layers.{i}." for i in range(num_layers, config.num_layers))
        config = config.truncated(num_layers)
    with CheckpointReader(path) as reader:
        names = _checkpoint_names(reader, prefix)
        with torch.device("meta"):
            meta = DenseTarget(config)
        want = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        if config.tie_word_embeddings:
            want.pop("lm_head.weight")
            names.pop("lm_head.weight", None)  # a tied copy some exports write anyway
        missing = sorted(k for k in want if k not in names)
        unexpected = sorted(names[k] for k in names if k not in want and not k.startswith(skipped))
        if missing:
            raise ValueError(f"{reader.path}: missing tensors {listing(missing)}")
        if unexpected:
            raise ValueError(f"{reader.path}: unexpected tensors {listing(unexpected)} (not part of a "
                             f"{config.family} target dspark implements)")
        for k, shape in want.items():
            if reader.shape(names[k]) != shape:
                raise ValueError(f"{reader.path}: {names[k]} has shape {list(reader.shape(names[k]))}, the config "
                                 f"needs {list(shape)}")
            if not reader.dtype(names[k]).is_floating_point:
                raise ValueError(f"{reader.path}: {names[k]} is {reader.dtype(names[k])}, not a float tensor")
        model = DenseTarget.empty(config, dtype=dtype, device=device)
        state = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for k in want:
                state[k].copy_(reader.get(names[k]).to(state[k].dtype))
    return model


__all__ = ["MODEL_TYPES", "dense_config_from_dict", "is_dense_config", "load_dense_target", "read_dense_config"]
