"""DeepSeek-V4 config.json (HF names, upstream legacy names, dspark_* fields) ↔ `ModelConfig`.

Every field is translated here and nowhere else (architecture.md §9); unknown values are refused
by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dspark.checkpoint.reader import config_path, raw_config
from dspark.config import DSparkFields, ModelConfig, RopeConfig

_LAYER_TYPES = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa",
                "heavily_compressed_attention": "hca"}
_LAYER_TYPES_HF = {v: k for k, v in _LAYER_TYPES.items()}
_RATIO_TO_LAYER_TYPE = {0: "sliding", 4: "csa", 128: "hca"}  # legacy `compress_ratios`
_MLP_TYPES = {"hash_moe": "hash", "moe": "score"}
_MLP_TYPES_HF = {v: k for k, v in _MLP_TYPES.items()}
_CSA, _HCA = "compressed_sparse_attention", "heavily_compressed_attention"
DSPARK_FIELDS = ("dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank")

# Defaults of `transformers.DeepseekV4Config` 5.24 for fields a config.json may omit.
HF_DEFAULTS = _HF_DEFAULTS = dict(
    vocab_size=129280, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, head_dim=512,
    q_lora_rank=1024, o_groups=8, o_lora_rank=1024, sliding_window=128, index_n_heads=64, index_head_dim=128,
    index_topk=512, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6, n_routed_experts=256,
    num_experts_per_tok=6, moe_intermediate_size=2048, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
    swiglu_limit=10.0, rope_theta=10000.0, compress_rope_theta=160000.0, max_position_embeddings=1048576,
    num_nextn_predict_layers=1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
    hidden_act="silu", mlp_bias=False,
)
_DEFAULT_COMPRESS_RATES = {_CSA: 4, _HCA: 128}
_DEFAULT_NUM_HASH_LAYERS = 3
_DEFAULT_PARTIAL_ROTARY_FACTOR = 64 / 512
# ModelConfig field ← HF field, for plain copies.
_INT_FIELDS = dict(
    vocab_size="vocab_size", hidden_size="hidden_size", num_layers="num_hidden_layers",
    num_heads="num_attention_heads", head_dim="head_dim", q_lora_rank="q_lora_rank", o_groups="o_groups",
    o_lora_rank="o_lora_rank", sliding_window="sliding_window", index_n_heads="index_n_heads",
    index_head_dim="index_head_dim", index_topk="index_topk", hc_mult="hc_mult",
    hc_sinkhorn_iters="hc_sinkhorn_iters", n_routed_experts="n_routed_experts",
    num_experts_per_tok="num_experts_per_tok", moe_intermediate_size="moe_intermediate_size",
    max_position_embeddings="max_position_embeddings",
)
_FLOAT_FIELDS = dict(hc_eps="hc_eps", rms_norm_eps="rms_norm_eps", routed_scaling_factor="routed_scaling_factor",
                     swiglu_limit="swiglu_limit")
# HF attribute aliases (`attribute_map`), read only when the real field is absent.
_ALIASES = {"n_routed_experts": "num_local_experts", "moe_intermediate_size": "intermediate_size"}
_ALIAS_OF = {alias: key for key, alias in _ALIASES.items()}
_LEGACY = ("compress_ratios", "compress_rate_csa", "compress_rate_hca", "num_hash_layers", "qk_rope_head_dim",
           "rope_scaling")
# Keys that ModelConfig fields stand for (config_to_dict regenerates them); all others go to `extra`.
_TRANSLATED = frozenset({
    *_HF_DEFAULTS, *_ALIASES.values(), *_LEGACY, *DSPARK_FIELDS, "model_type", "architectures", "layer_types",
    "mlp_layer_types", "compress_rates", "partial_rotary_factor", "rope_parameters", "n_mtp_layers",
})


class _Fields:
    """Typed access to a config.json dict with HF's defaults."""

    def __init__(self, d: dict):
        if not isinstance(d, dict):
            raise ValueError(f"config must be a dict, got {type(d).__name__}")
        self.d = d

    def get(self, key: str, default=None):
        """The value of `key`, or `default` when it is absent or null."""
        value = self.d.get(key)
        return default if value is None else value

    def nullable(self, key: str):
        """The value of `key` (null allowed), or HF's default when it is absent."""
        return self.d[key] if key in self.d else _HF_DEFAULTS[key]

    def field(self, key: str):
        """The value of an HF field (or its alias), of the type of HF's default for it."""
        alias = _ALIASES.get(key)
        if key not in self.d and alias is not None and self.get(alias) is not None:
            key = alias
        value = self.get(key, _HF_DEFAULTS.get(key, _HF_DEFAULTS.get(_ALIAS_OF.get(key, key))))
        like = _HF_DEFAULTS.get(key, _HF_DEFAULTS.get(_ALIAS_OF.get(key, key)))
        if isinstance(like, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(like, int):
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(like, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            kind = "a finite number"
        else:
            ok, kind = isinstance(value, type(like)), f"a {type(like).__name__}"
        if not ok:
            raise ValueError(f"{key} must be {kind}, got {value!r}")
        return value


def config_from_dict(d: dict) -> ModelConfig:
    """Translate an HF-style or legacy upstream config.json dict into a `ModelConfig`.

    Absent fields take HF 5.24's defaults. `mtp_kind` / `num_mtp_layers` say what the config announces
    (`dspark_*` fields → DSpark stages, else `num_nextn_predict_layers` MTP blocks); `load_model`
    replaces them with what the checkpoint really holds. Other keys (quantization_config, ...) are
    kept verbatim in `extra`.
    """
    f = _Fields(d)
    model_type = f.get("model_type", "deepseek_v4")
    if model_type != "deepseek_v4":
        raise ValueError(f"model_type {model_type!r} is not 'deepseek_v4'")
    for key, want in (("hidden_act", "silu"), ("mlp_bias", False)):
        if f.field(key) != want:
            raise ValueError(f"{key} = {f.get(key)!r} is not supported (only {want!r})")
    scoring = f.field("scoring_func")
    if scoring not in ("sqrtsoftplus", "sigmoid"):
        raise ValueError(f"scoring_func {scoring!r} is not supported; expected 'sqrtsoftplus' or 'sigmoid'")

    n = f.field("num_hidden_layers")
    head_dim = f.field("head_dim")
    rates = _compress_rates(f)
    prf = f.get("partial_rotary_factor")
    if prf is None:
        qk_rope = f.get("qk_rope_head_dim")
        prf = qk_rope / head_dim if qk_rope is not None else _DEFAULT_PARTIAL_ROTARY_FACTOR
    rope_dim = int(head_dim * prf)  # HF's `qk_rope_head_dim`
    main, compress = _rope_dicts(f)
    max_pos = f.field("max_position_embeddings")
    eos = f.nullable("eos_token_id")
    eos_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    if not all(isinstance(t, int) for t in eos_ids):
        raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos!r}")
    mtp_kind, num_mtp, dspark = _mtp_fields(f)

    fields = {ours: f.field(hf) for ours, hf in _INT_FIELDS.items()}
    fields.update({ours: float(f.field(hf)) for ours, hf in _FLOAT_FIELDS.items()})
    fields.update(
        rope_head_dim=rope_dim, layer_types=_layer_types(f, n), csa_rate=rates[_CSA], hca_rate=rates[_HCA],
        mlp_layer_types=_mlp_layer_types(f, n), scoring_func=scoring,
        main_rope=_rope_config(main, "main", head_dim, rope_dim, max_pos),
        compress_rope=_rope_config(compress, "compress", head_dim, rope_dim, max_pos),
        mtp_kind=mtp_kind, num_mtp_layers=num_mtp, dspark=dspark,
        tie_word_embeddings=f.field("tie_word_embeddings"), bos_token_id=f.nullable("bos_token_id"),
        eos_token_ids=eos_ids,
    )
    extra = []
    for key in sorted(set(d) - _TRANSLATED):
        try:
            extra.append((key, json.dumps(d[key], sort_keys=True)))
        except TypeError as e:
            raise ValueError(f"config field {key!r} is not JSON-serialisable: {e}") from None
    return ModelConfig(**fields, extra=tuple(extra))


def _compress_rates(f: _Fields) -> dict[str, int]:
    rates = dict(_DEFAULT_COMPRESS_RATES)
    given = f.get("compress_rates", {})
    unknown = sorted(set(given) - set(rates))
    if unknown:
        raise ValueError(f"compress_rates has unknown layer types {unknown}; expected {sorted(rates)}")
    rates.update(given)
    for legacy, key in (("compress_rate_csa", _CSA), ("compress_rate_hca", _HCA)):
        if f.get(legacy) is not None:
            rates[key] = f.get(legacy)
    return rates


def _layer_types(f: _Fields, n: int) -> tuple[str, ...]:
    """`layer_types` > legacy `compress_ratios` > HF's default schedule, truncated to n layers."""
    given, ratios = f.get("layer_types"), f.get("compress_ratios")
    if given is not None:
        bad = sorted({t for t in given if t not in _LAYER_TYPES}, key=str)
        if bad:
            raise ValueError(f"layer_types has unknown values {bad}; expected {sorted(_LAYER_TYPES)}")
        types = [_LAYER_TYPES[t] for t in given]
    elif ratios is not None:
        for i, r in enumerate(ratios):
            if r not in _RATIO_TO_LAYER_TYPE:
                raise ValueError(f"compress_ratios[{i}] = {r!r}: only 0/4/128 name a layer type; give "
                                 "layer_types and compress_rates for other rates")
        types = [_RATIO_TO_LAYER_TYPE[r] for r in ratios]
    else:  # two HCA layers, then HCA / CSA alternating
        types = ["hca"] * min(n, 2) + ["csa" if i % 2 else "hca" for i in range(max(n - 2, 0))]
    if len(types) < n:
        raise ValueError(f"{'layer_types' if given is not None else 'compress_ratios'} has {len(types)} entries "
                         f"for num_hidden_layers = {n}")
    return tuple(types[:n])


def _mlp_layer_types(f: _Fields, n: int) -> tuple[str, ...]:
    given = f.get("mlp_layer_types")
    if given is None:
        n_hash = f.get("num_hash_layers", _DEFAULT_NUM_HASH_LAYERS)
        return ("hash",) * min(n, n_hash) + ("score",) * max(0, n - n_hash)
    bad = sorted({t for t in given if t not in _MLP_TYPES}, key=str)
    if bad:
        raise ValueError(f"mlp_layer_types has unknown values {bad}; expected {sorted(_MLP_TYPES)}")
    if len(given) < n:
        raise ValueError(f"mlp_layer_types has {len(given)} entries for num_hidden_layers = {n}")
    return tuple(_MLP_TYPES[t] for t in given[:n])


def _rope_dicts(f: _Fields) -> tuple[dict, dict]:
    """The (main, compress) rope parameter dicts as HF 5.24 resolves them (deepseek_v4.md §5.1)."""
    rope_theta = f.field("rope_theta")
    rp = f.get("rope_scaling") or f.get("rope_parameters") or {}  # HF: `rope_scaling or rope_parameters`
    if not isinstance(rp, dict):
        raise ValueError(f"rope_parameters must be a dict, got {rp!r}")
    nested = [k for k in ("main", "compress") if k in rp]
    if nested:
        if len(nested) != 2 or not all(isinstance(rp[k], dict) for k in nested):
            raise ValueError("rope_parameters must nest both a 'main' and a 'compress' dict, or neither")
        # HF fills missing nested thetas from the top-level rope_theta.
        main, compress = ({"rope_theta": rope_theta, **rp[k]} for k in ("main", "compress"))
    else:
        main = {"rope_type": "default", "rope_theta": rope_theta}
        compress = {**rp, "rope_theta": f.field("compress_rope_theta")}
        compress.setdefault("rope_type", compress.get("type", "default"))
        if compress["rope_type"] == "yarn":
            compress.setdefault("attention_factor", 1.0)  # V4 applies no YaRN mscale unless told
    for sub in (main, compress):
        sub.setdefault("rope_type", sub.get("type", "default"))
        if sub["rope_type"] == "yarn":
            sub.setdefault("original_max_position_embeddings", f.field("max_position_embeddings"))
    return main, compress


def _rope_config(p: dict, label: str, head_dim: int, rope_dim: int, max_pos: int) -> RopeConfig:
    kind = p["rope_type"]
    if kind not in ("default", "yarn"):
        raise ValueError(f"rope_parameters[{label!r}].rope_type {kind!r} is not supported; "
                         "expected 'default' or 'yarn'")
    prf = p.get("partial_rotary_factor")
    if prf is not None and int(head_dim * prf) != rope_dim:
        raise ValueError(f"rope_parameters[{label!r}].partial_rotary_factor {prf} gives {int(head_dim * prf)} rope "
                         f"dims, but the model has {rope_dim}")
    if kind == "default":
        return RopeConfig(theta=float(p["rope_theta"]))
    # NOTE: HF reads `truncate` from the top level of the nested dict, so it is always on for V4.
    original = p["original_max_position_embeddings"]
    factor = p.get("factor")
    if factor is None:
        factor = max_pos / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:  # HF's YaRN mscale (reachable only through nested rope_parameters)
        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return RopeConfig(theta=float(p["rope_theta"]), kind="yarn", factor=float(factor),
                      original_max_position=int(original), beta_fast=float(p.get("beta_fast") or 32),
                      beta_slow=float(p.get("beta_slow") or 1), attention_factor=float(attention_factor))


def _mtp_fields(f: _Fields) -> tuple[str, int, DSparkFields | None]:
    present = [k for k in DSPARK_FIELDS if f.get(k) is not None]
    dspark = None
    if present:
        if len(present) != len(DSPARK_FIELDS):
            missing = [k for k in DSPARK_FIELDS if k not in present]
            raise ValueError(f"config has {present} but lacks {missing}")
        taps = f.get("dspark_target_layer_ids")
        if not isinstance(taps, (list, tuple)) or not all(isinstance(t, int) and t >= 0 for t in taps):
            raise ValueError(f"dspark_target_layer_ids must be a list of layer indices, got {taps!r}")
        for key in ("dspark_block_size", "dspark_markov_rank"):
            if not isinstance(f.get(key), int) or f.get(key) <= 0:
                raise ValueError(f"{key} must be a positive int, got {f.get(key)!r}")
        if not isinstance(f.get("dspark_noise_token_id"), int) or f.get("dspark_noise_token_id") < 0:
            raise ValueError(f"dspark_noise_token_id must be a token id, got {f.get('dspark_noise_token_id')!r}")
        dspark = DSparkFields(block_size=f.get("dspark_block_size"), noise_token_id=f.get("dspark_noise_token_id"),
                              target_layer_ids=tuple(taps), markov_rank=f.get("dspark_markov_rank"))
    n_nextn = f.field("num_nextn_predict_layers")
    if n_nextn <= 0:
        return "none", 0, dspark
    if dspark is not None:
        # The -DSpark root config says num_nextn_predict_layers = 1 for 3 stages (dspark_v4.md §1.2):
        # the reference config's `n_mtp_layers`, else one stage per tapped layer (SGLang's rule).
        return "dspark", f.get("n_mtp_layers", len(dspark.target_layer_ids)), dspark
    return "mtp", n_nextn, dspark


def _partial_rotary_factor(rope_dim: int, head_dim: int) -> float:
    """rope_dim / head_dim, nudged up so HF's `int(head_dim * factor)` gives back rope_dim."""
    factor = rope_dim / head_dim
    while int(head_dim * factor) < rope_dim:
        factor = math.nextafter(factor, 1.0)
    return factor


def _rope_dict(rope: RopeConfig, prf: float) -> dict:
    d = {"rope_type": rope.kind, "rope_theta": rope.theta, "partial_rotary_factor": prf}
    if rope.kind == "yarn":
        d.update(factor=rope.factor, original_max_position_embeddings=rope.original_max_position,
                 beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, attention_factor=rope.attention_factor)
    return d


def config_to_dict(cfg: ModelConfig) -> dict:
    """An HF-style config.json dict (modern field names, nested rope_parameters) describing `cfg`.

    `config_from_dict(config_to_dict(cfg)) == cfg` (except for an MTP module together with `dspark_*`
    fields, which a config cannot tell from DSpark stages), and `transformers.DeepseekV4Config(**d)`
    builds the same model. `extra` fields are written back unchanged.
    """
    prf = _partial_rotary_factor(cfg.rope_head_dim, cfg.head_dim)
    d = {k: json.loads(v) for k, v in cfg.extra}
    d.update({hf: getattr(cfg, ours) for ours, hf in {**_INT_FIELDS, **_FLOAT_FIELDS}.items()})
    eos = cfg.eos_token_ids
    d.update(
        model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"],
        layer_types=[_LAYER_TYPES_HF[t] for t in cfg.layer_types],
        compress_rates={_CSA: cfg.csa_rate, _HCA: cfg.hca_rate},
        mlp_layer_types=[_MLP_TYPES_HF[t] for t in cfg.mlp_layer_types],
        scoring_func=cfg.scoring_func, partial_rotary_factor=prf,
        rope_theta=cfg.main_rope.theta, compress_rope_theta=cfg.compress_rope.theta,
        rope_parameters={"main": _rope_dict(cfg.main_rope, prf), "compress": _rope_dict(cfg.compress_rope, prf)},
        num_nextn_predict_layers=cfg.num_mtp_layers, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id, eos_token_id=None if not eos else eos[0] if len(eos) == 1 else list(eos),
    )
    if cfg.dspark is not None:
        d.update(dspark_block_size=cfg.dspark.block_size, dspark_noise_token_id=cfg.dspark.noise_token_id,
                 dspark_target_layer_ids=list(cfg.dspark.target_layer_ids), dspark_markov_rank=cfg.dspark.markov_rank)
        if cfg.mtp_kind == "dspark":
            d["n_mtp_layers"] = cfg.num_mtp_layers
    return d



def read_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory (or of the directory holding a .safetensors file)."""
    try:
        return config_from_dict(raw_config(path))
    # A value of the wrong shape deep in a nested field (rope parameters, layer lists) surfaces as one
    # of these; every one is the file's fault and is reported as such, in one line.
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as e:
        raise ValueError(f"{config_path(path)}: {type(e).__name__ + ': ' if not isinstance(e, ValueError) else ''}"
                         f"{e}") from None


