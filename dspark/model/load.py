"""Checkpoint conversion: config.json ↔ `ModelConfig`, tensor names, reading, loading, saving.

Layouts (architecture.md §9): (a) HF's in-memory `DeepseekV4ForCausalLM` names, which are the
model's own names (identity mapping); (b) upstream DeepSeek names (deepseek_v4.md §13.2), per-expert
`w1/w2/w3` matrices, int32 `tid2eid`, FP8 e4m3 weights with 128×128 UE8M0 `.scale` siblings and
FP4 routed experts, in one file or sharded behind `model.safetensors.index.json`.

Loading is driven by the model: every tensor of `model.state_dict()` names the checkpoint tensors it
is built from (exact names, never substring rules, so `markov_w1` is never mistaken for an expert
`w1`), and every checkpoint tensor must be claimed by one of them. Missing, unexpected and
mis-shaped tensors are all reported before anything is read. Only safetensors are opened (mmap,
one tensor at a time); nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Iterable, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dspark.config import DSparkFields, ModelConfig, RopeConfig
from dspark.model.quant import SCALE_DTYPES, dequantize_fp4, dequantize_fp8

# ============================================================================ config translation
_LAYER_TYPES = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa",
                "heavily_compressed_attention": "hca"}
_LAYER_TYPES_HF = {v: k for k, v in _LAYER_TYPES.items()}
_RATIO_TO_LAYER_TYPE = {0: "sliding", 4: "csa", 128: "hca"}  # legacy `compress_ratios`
_MLP_TYPES = {"hash_moe": "hash", "moe": "score"}
_MLP_TYPES_HF = {v: k for k, v in _MLP_TYPES.items()}
_CSA, _HCA = "compressed_sparse_attention", "heavily_compressed_attention"
_DSPARK_FIELDS = ("dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank")

# Defaults of `transformers.DeepseekV4Config` 5.24 for fields a config.json may omit.
_HF_DEFAULTS = dict(
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
_LEGACY = ("compress_ratios", "compress_rate_csa", "compress_rate_hca", "num_hash_layers", "qk_rope_head_dim",
           "rope_scaling")
# Keys that ModelConfig fields stand for (config_to_dict regenerates them); all others go to `extra`.
_TRANSLATED = frozenset({
    *_HF_DEFAULTS, *_ALIASES.values(), *_LEGACY, *_DSPARK_FIELDS, "model_type", "architectures", "layer_types",
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
        alias = _ALIASES.get(key)
        if key not in self.d and alias is not None and self.get(alias) is not None:
            return self.get(alias)
        return self.get(key, _HF_DEFAULTS[key])


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
        tie_word_embeddings=bool(f.field("tie_word_embeddings")), bos_token_id=f.nullable("bos_token_id"),
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
    present = [k for k in _DSPARK_FIELDS if f.get(k) is not None]
    dspark = None
    if present:
        if len(present) != len(_DSPARK_FIELDS):
            missing = [k for k in _DSPARK_FIELDS if k not in present]
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


def config_path(path: str | Path) -> Path:
    path = Path(path)
    return (path.parent if path.is_file() else path) / "config.json"


def raw_config(path: str | Path) -> dict:
    """The config.json of a checkpoint directory (or of the directory holding a .safetensors file)."""
    file = config_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json beside the checkpoint")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def read_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint directory (or of the directory holding a .safetensors file)."""
    try:
        return config_from_dict(raw_config(path))
    except ValueError as e:
        raise ValueError(f"{config_path(path)}: {e}") from None


# ============================================================================ tensor names
# Model (HF) name → upstream name. Top level:
_TOP = {
    "model.embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight", "model.norm.weight": "norm.weight",
    "model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
    "model.hc_head.hc_scale": "hc_head_scale",
}
# Inside a decoder layer (`model.layers.{i}.` ↔ `layers.{i}.`) and an MTP block (`mtp.{k}.` on both sides):
_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"{hc}_hc.{p}": f"hc_{hc}_{p}" for hc in ("attn", "ffn") for p in ("fn", "base", "scale")},
    "self_attn.sinks": "attn.attn_sink",
    "self_attn.q_a_proj.weight": "attn.wq_a.weight", "self_attn.q_a_norm.weight": "attn.q_norm.weight",
    "self_attn.q_b_proj.weight": "attn.wq_b.weight", "self_attn.kv_proj.weight": "attn.wkv.weight",
    "self_attn.kv_norm.weight": "attn.kv_norm.weight", "self_attn.o_a_proj.weight": "attn.wo_a.weight",
    "self_attn.o_b_proj.weight": "attn.wo_b.weight",
    "self_attn.compressor.kv_proj.weight": "attn.compressor.wkv.weight",
    "self_attn.compressor.gate_proj.weight": "attn.compressor.wgate.weight",
    "self_attn.compressor.position_bias": "attn.compressor.ape",
    "self_attn.compressor.kv_norm.weight": "attn.compressor.norm.weight",
    "self_attn.compressor.indexer.q_b_proj.weight": "attn.indexer.wq_b.weight",
    "self_attn.compressor.indexer.scorer.weights_proj.weight": "attn.indexer.weights_proj.weight",
    "self_attn.compressor.indexer.kv_proj.weight": "attn.indexer.compressor.wkv.weight",
    "self_attn.compressor.indexer.gate_proj.weight": "attn.indexer.compressor.wgate.weight",
    "self_attn.compressor.indexer.position_bias": "attn.indexer.compressor.ape",
    "self_attn.compressor.indexer.kv_norm.weight": "attn.indexer.compressor.norm.weight",
    "mlp.gate.weight": "ffn.gate.weight", "mlp.gate.e_score_correction_bias": "ffn.gate.bias",
    "mlp.gate.tid2eid": "ffn.gate.tid2eid",
    "mlp.shared_experts.gate_proj.weight": "ffn.shared_experts.w1.weight",
    "mlp.shared_experts.up_proj.weight": "ffn.shared_experts.w3.weight",
    "mlp.shared_experts.down_proj.weight": "ffn.shared_experts.w2.weight",
}
# Only in an MTP block (deepseek_v4.md §12.2):
_MTP_ONLY = {
    "enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "e_proj.weight": "e_proj.weight",
    "h_proj.weight": "h_proj.weight", "norm.weight": "norm.weight", "hc_head.hc_fn": "hc_head_fn",
    "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale",
}
# Stacked expert tensors → the per-expert upstream matrices they are built from, in row order:
# gate_up_proj[e] = cat(w1, w3) [2I, D]; down_proj[e] = w2 [D, I].
_EXPERTS = {"mlp.experts.gate_up_proj": ("w1", "w3"), "mlp.experts.down_proj": ("w2",)}
_BLOCK_PREFIX = re.compile(r"(model\.layers|layers|mtp)\.(\d+)\.")


class Source(NamedTuple):
    """One checkpoint tensor a model tensor is built from (`expert`/`part` for stacked experts)."""

    key: str
    expert: int | None = None
    part: str | None = None  # "w1" gate rows, "w3" up rows, "w2"


def _split_block(name: str) -> tuple[str, int, str] | None:
    """'model.layers.3.x' → ('model.layers', 3, 'x'); likewise 'layers.3.x' and 'mtp.0.x'."""
    m = _BLOCK_PREFIX.match(name)
    return (m.group(1), int(m.group(2)), name[m.end():]) if m else None


def upstream_sources(name: str, shape: Iterable[int]) -> list[Source]:
    """The upstream checkpoint tensors that build model tensor `name` (of `shape`)."""
    if name in _TOP:
        return [Source(_TOP[name])]
    split = _split_block(name)
    if split is not None and split[0] in ("model.layers", "mtp"):
        kind, index, rel = split
        prefix = f"layers.{index}." if kind == "model.layers" else f"mtp.{index}."
        if rel in _EXPERTS:
            num_experts = list(shape)[0]
            return [Source(f"{prefix}ffn.experts.{e}.{part}.weight", e, part)
                    for e in range(num_experts) for part in _EXPERTS[rel]]
        table = _BLOCK if kind == "model.layers" else {**_BLOCK, **_MTP_ONLY}
        if rel in table:
            return [Source(prefix + table[rel])]
    raise ValueError(f"no upstream name for model tensor {name!r}")


# The V4 DSpark draft's own names → the release's `mtp.<s>.*` names (dspark_v4.md §2.1): stage 0
# owns the context projection; the last stage owns the collapse head, the final norm and the heads.
_DSPARK_FIRST = {"main_proj.weight": "main_proj.weight", "main_norm.weight": "main_norm.weight"}
_DSPARK_LAST = {"norm.weight": "norm.weight", "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base",
                "hc_head.hc_scale": "hc_head_scale", "markov_head.markov_w1.weight": "markov_head.markov_w1.weight",
                "markov_head.markov_w2.weight": "markov_head.markov_w2.weight",
                "confidence_head.proj.weight": "confidence_head.proj.weight"}
_STAGE = re.compile(r"stages\.(\d+)\.(.+)")


def dspark_stage_sources(name: str, shape: Iterable[int], num_stages: int) -> list[Source]:
    """The release tensors that build draft tensor `name` (`dspark.model.draft_v4.V4DSparkDraft`)."""
    if name in _DSPARK_FIRST:
        return [Source("mtp.0." + _DSPARK_FIRST[name])]
    if name in _DSPARK_LAST:
        return [Source(f"mtp.{num_stages - 1}." + _DSPARK_LAST[name])]
    m = _STAGE.fullmatch(name)
    if m is not None:
        prefix, rel = f"mtp.{m.group(1)}.", m.group(2)
        if rel in _EXPERTS:
            return [Source(f"{prefix}ffn.experts.{e}.{part}.weight", e, part)
                    for e in range(list(shape)[0]) for part in _EXPERTS[rel]]
        if rel in _BLOCK and not rel.startswith("self_attn.compressor") and rel != "mlp.gate.tid2eid":
            return [Source(prefix + _BLOCK[rel])]
    raise ValueError(f"no release name for draft tensor {name!r}")


def to_upstream(state: dict[str, torch.Tensor], sources=upstream_sources) -> dict[str, torch.Tensor]:
    """Model-named tensors → upstream-named tensors (experts split per expert, tid2eid int32)."""
    out = {}
    for name, t in state.items():
        for src in sources(name, t.shape):
            if src.part is None:
                out[src.key] = t.to(torch.int32) if name.endswith(".tid2eid") else t
            else:
                out[src.key] = _expert_slice(t, src).clone()  # safetensors refuses shared storage
    return out


def _expert_slice(stacked: torch.Tensor, src: Source) -> torch.Tensor:
    rows = stacked.shape[1] // 2
    return {"w1": stacked[src.expert, :rows], "w3": stacked[src.expert, rows:], "w2": stacked[src.expert]}[src.part]


def detect_layout(keys: Iterable[str]) -> str:
    """'hf' (model names) or 'upstream', from the non-`mtp.*` tensor names; a mix is refused."""
    keys = list(keys)
    hf = [k for k in keys if k.startswith("model.") or k == "lm_head.weight"]
    upstream = [k for k in keys if k.startswith("layers.") or k in _TOP.values()]
    if hf and upstream:
        raise ValueError(f"checkpoint mixes HF names ({hf[0]!r}) and upstream names ({upstream[0]!r}); "
                         "transformers' save_pretrained writes such a mix: save its state_dict() instead")
    if not hf and not upstream:
        raise ValueError(f"no DeepSeek-V4 tensor names in the checkpoint (first keys: {keys[:5]})")
    return "hf" if hf else "upstream"


def detect_mtp(keys: Iterable[str], raw_config: dict) -> tuple[str, int]:
    """What the checkpoint's `mtp.*` namespace holds: ('none', 0), ('mtp', blocks) or ('dspark', stages).

    DSpark stages are recognised by `mtp.0.main_proj.weight` and need the `dspark_*` config fields;
    an MTP module by `e_proj` / `enorm` / `hnorm`. The count is the number of distinct `mtp.<s>`.
    """
    mtp = [k for k in keys if k.startswith("mtp.")]
    if not mtp:
        return "none", 0
    stages = set()
    for k in mtp:
        split = _split_block(k)
        if split is None:
            raise ValueError(f"malformed mtp tensor name {k!r} (expected mtp.<index>.<name>)")
        stages.add(split[1])
    if stages != set(range(len(stages))):
        raise ValueError(f"mtp stages {sorted(stages)} are not numbered 0..{len(stages) - 1}")
    rels = {_split_block(k)[2] for k in mtp}
    if "mtp.0.main_proj.weight" in mtp:
        missing = [k for k in _DSPARK_FIELDS if raw_config.get(k) is None]
        if missing:
            raise ValueError(f"checkpoint holds DSpark stages (mtp.0.main_proj.weight) but config.json lacks {missing}")
        return "dspark", len(stages)
    if rels & {"e_proj.weight", "enorm.weight", "hnorm.weight"}:
        return "mtp", len(stages)
    raise ValueError(f"unrecognised mtp.* tensors (neither an MTP module nor DSpark stages), e.g. {sorted(mtp)[:5]}")


# ============================================================================ reading
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointReader:
    """Lazy read-only access to a safetensors checkpoint: a directory with `model.safetensors` or
    `model.safetensors.index.json` + shards, or one .safetensors file.

    Every file's header is checked when opened (missing shards, truncated or corrupt files and index
    entries a shard does not hold are refused, naming the file); tensors are read one at a time
    from memory-mapped files.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        self._files: dict[Path, object] = {}  # file → open safe_open handle
        self._where: dict[str, Path] = {}  # tensor name → file
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ValueError(f"{path}: not a .safetensors file (pickled formats are never read)")
            self._add_file(path, None)
        elif path.is_dir():
            index, single = path / "model.safetensors.index.json", path / "model.safetensors"
            if index.is_file():
                self._read_index(index)
            elif single.is_file():
                self._add_file(single, None)
            else:
                pickled = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
                hint = f"; found {pickled}, which would need unpickling and is never read" if pickled else ""
                raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
        else:
            raise FileNotFoundError(f"{path}: no such checkpoint file or directory")

    def _read_index(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map is not a dict")
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        for shard, names in shards.items():
            if not isinstance(shard, str) or (index.parent / shard).resolve().parent != index.parent.resolve():
                raise ValueError(f"{index}: shard {shard!r} is not a file name inside the checkpoint directory")
            file = index.parent / shard
            if not file.is_file():
                raise ValueError(f"{index}: shard {shard} is missing (needed for {names[0]!r} and "
                                 f"{len(names) - 1} more)")
            self._add_file(file, names)

    def _add_file(self, file: Path, names: list[str] | None) -> None:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
            held = set(handle.keys())
        except Exception as e:  # safetensors raises its own error type for corrupt headers
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        absent = [n for n in names if n not in held] if names is not None else []
        if absent:
            raise ValueError(f"{file}: the index maps {_listing(absent)} to this file, which does not hold them")
        self._files[file] = handle
        for name in (names if names is not None else sorted(held)):
            self._where[name] = file

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _slice(self, name: str):
        if name not in self._where:
            raise KeyError(f"{name!r} is not in checkpoint {self.path}")
        return self._files[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._slice(name).get_dtype()
        if code not in _DTYPES:
            raise ValueError(f"{name!r} in {self._where[name]} has unsupported dtype {code}")
        return _DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read into memory."""
        self._slice(name)  # raises KeyError for unknown names
        try:
            return self._files[self._where[name]].get_tensor(name)
        except Exception as e:
            raise ValueError(f"{self._where[name]}: cannot read {name!r} ({e})") from None

    def close(self) -> None:
        self._files.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _listing(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _scale_key(key: str) -> str | None:
    """Upstream FP8/FP4 scales hang off the projection: `x.wq_a.weight` ↔ `x.wq_a.scale`."""
    return key[: -len(".weight")] + ".scale" if key.endswith(".weight") else None


def _fp8_block(raw_config: dict) -> tuple[int, int]:
    block = (raw_config.get("quantization_config") or {}).get("weight_block_size", (128, 128))
    return int(block[0]), int(block[1])


class _Stored(NamedTuple):
    """How a checkpoint tensor is stored: 'fp8' / 'fp4' (with a scale), 'float' or 'int'."""

    kind: str
    shape: tuple[int, ...]  # logical (dequantised) shape


def _describe(reader: CheckpointReader, key: str, fp8_block: tuple[int, int]) -> _Stored:
    """Storage kind and logical shape from the headers alone; a bad scale raises ValueError."""
    dtype, shape = reader.dtype(key), reader.shape(key)
    scale = _scale_key(key)
    if scale is None or scale not in reader:
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise ValueError(f"{key} is {dtype} but has no {scale}")
        return _Stored("float" if dtype.is_floating_point else "int", shape)
    if len(shape) != 2:
        raise ValueError(f"{key} has a .scale sibling but is {len(shape)}-D")
    n, k = shape
    if dtype == torch.float8_e4m3fn:
        kind, want = "fp8", (math.ceil(n / fp8_block[0]), math.ceil(k / fp8_block[1]))
    elif dtype in (torch.int8, torch.uint8):
        kind, k = "fp4", 2 * k
        want = (n, math.ceil(k / 32))
    else:
        raise ValueError(f"{key} has a .scale sibling but dtype {dtype} (expected float8_e4m3fn or packed int8 FP4)")
    if reader.dtype(scale) not in SCALE_DTYPES:
        raise ValueError(f"{scale} is {reader.dtype(scale)}; scales must be one of {SCALE_DTYPES}")
    if reader.shape(scale) != want:
        raise ValueError(f"{scale} has shape {list(reader.shape(scale))}, {kind} weight {key} needs {list(want)}")
    return _Stored(kind, (n, k))


def _read(reader: CheckpointReader, key: str, fp8_block: tuple[int, int]) -> torch.Tensor:
    """A checkpoint tensor, dequantised to float32 when it has a `.scale` sibling."""
    t = reader.get(key)
    scale = _scale_key(key)
    if scale is None or scale not in reader:
        return t
    if t.dtype == torch.float8_e4m3fn:
        return dequantize_fp8(t, reader.get(scale), fp8_block)
    return dequantize_fp4(t, reader.get(scale))


def read_mtp_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's `mtp.*` tensors under their checkpoint names, FP8/FP4 dequantised; floating
    tensors as float32 (for the DSpark draft, which is not part of `DeepseekV4`)."""
    block = _fp8_block(raw_config(path))
    out = {}
    with CheckpointReader(path) as reader:
        keys = set(reader.keys())
        scales = {_scale_key(k) for k in keys} & keys
        for key in sorted(k for k in keys if k.startswith("mtp.") and k not in scales):
            _describe(reader, key, block)  # validates scale shapes and dtypes
            t = _read(reader, key, block)
            out[key] = t.float() if t.is_floating_point() else t
    return out


# ============================================================================ loading and saving
def load_weights(model: nn.Module, checkpoint: str | Path | CheckpointReader, *, num_layers: int | None = None,
                 load_mtp: bool = True, fp8_block: tuple[int, int] = (128, 128), sources=None) -> None:
    """Copy a checkpoint into `model` (HF tensor names), strictly, one tensor at a time.

    Checkpoint tensors of layers >= `num_layers`, and all `mtp.*` tensors unless `load_mtp`, are
    skipped. Every other tensor must be claimed by a model tensor and every model tensor must be
    found, with matching shapes and compatible dtypes; otherwise ValueError lists the offenders
    before anything is copied. `sources(name, shape)` replaces the name mapping for models that
    read only the `mtp.*` namespace (the V4 DSpark draft); everything else is then skipped.
    """
    if not isinstance(checkpoint, CheckpointReader):
        with CheckpointReader(checkpoint) as reader:
            return load_weights(model, reader, num_layers=num_layers, load_mtp=load_mtp, fp8_block=fp8_block,
                                sources=sources)
    reader = checkpoint
    state = model.state_dict()
    if sources is not None:
        layout = "mtp"
        plan = {name: sources(name, t.shape) for name, t in state.items()}
    else:
        layout = detect_layout(reader.keys())
        plan = {name: ([Source(name)] if layout == "hf" else upstream_sources(name, t.shape))
                for name, t in state.items()}

    def skipped(key: str) -> bool:
        split = _split_block(key)
        if sources is not None:
            return split is None or split[0] != "mtp"
        if split is None:
            return False
        if split[0] == "mtp":
            return not load_mtp
        return num_layers is not None and split[1] >= num_layers

    errors = _problems(reader, state, plan, skipped, fp8_block)
    if errors:
        raise ValueError(f"cannot load {reader.path} ({layout} layout) into the model: " + "; ".join(errors))
    with torch.no_grad():
        for name, srcs in plan.items():
            for src in srcs:
                param = state[name] if src.part is None else _expert_slice(state[name], src)
                param.copy_(_read(reader, src.key, fp8_block))


def _problems(reader: CheckpointReader, state: dict[str, torch.Tensor], plan: dict[str, list[Source]],
              skipped, fp8_block: tuple[int, int]) -> list[str]:
    """Every reason `plan` cannot fill `state` from `reader`, one section per kind (empty if none)."""
    claimed = {src.key for srcs in plan.values() for src in srcs}
    scales = {_scale_key(k) for k in claimed} & set(reader.keys())
    unexpected = [k for k in reader.keys() if k not in claimed and k not in scales and not skipped(k)]
    missing, misshaped, bad = [], [], []
    for name, srcs in plan.items():
        param = state[name]
        for src in srcs:
            if src.key not in reader:
                missing.append(src.key)
                continue
            try:
                stored = _describe(reader, src.key, fp8_block)
            except ValueError as e:
                bad.append(str(e))
                continue
            want = tuple(param.shape) if src.part is None else tuple(_expert_slice(param, src).shape)
            if stored.shape != want:
                misshaped.append(f"{src.key} {list(stored.shape)} (model {name} needs {list(want)})")
            elif (stored.kind == "int") != (not param.is_floating_point()):
                bad.append(f"{src.key} holds {stored.kind} data but {name} is {param.dtype}")
            elif name.endswith(".tid2eid"):  # small [V, K]: read twice so a bad table never half-loads
                experts = _num_experts(state, name)
                ids = reader.get(src.key)
                if ids.min() < 0 or ids.max() >= experts:
                    bad.append(f"{src.key} holds expert ids outside 0..{experts - 1}")
    return [f"{len(v)} {what}: {_listing(v)}" for what, v in
            (("missing tensors", missing), ("unexpected tensors", unexpected), ("mis-shaped tensors", misshaped),
             ("bad tensors", bad)) if v]


def _num_experts(state: dict[str, torch.Tensor], tid2eid_name: str) -> int:
    return state[tid2eid_name[: -len("tid2eid")] + "weight"].shape[0]  # the router's [E, D] weight


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               num_layers: int | None = None, kernels: str = "auto"):
    """Build a `DeepseekV4` from a checkpoint directory (HF names, upstream names, or sharded FP8/FP4).

    `config.mtp_kind` follows the checkpoint's `mtp.*` tensors: an MTP module is built and loaded;
    DSpark stages are not modules (read them with `read_mtp_state`). `num_layers` builds only the
    first layers and skips the rest; `mtp.*` is then skipped too, since it continues the full-depth
    model. Weights are allocated once in `dtype` (fp32 islands stay fp32). `kernels`: `ModelConfig.kernels`.
    """
    from dspark.model.target import DeepseekV4  # the model imports this module for from_pretrained

    config = read_config(path).replace(kernels=kernels)
    raw = raw_config(path)
    with CheckpointReader(path) as reader:
        kind, stages = detect_mtp(reader.keys(), raw)
        config = config.replace(mtp_kind=kind, num_mtp_layers=stages)
        truncated = num_layers is not None and num_layers != config.num_layers
        if truncated:
            config = config.truncated(num_layers).replace(mtp_kind="none", num_mtp_layers=0)
        model = DeepseekV4.empty(config, dtype=dtype, device=device)
        load_weights(model, reader, num_layers=num_layers if truncated else None,
                     load_mtp=config.mtp_kind == "mtp", fp8_block=_fp8_block(raw))
    return model


def load_dspark_draft(path: str | Path, target=None, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", confidence_pre_norm: bool = True, kernels: str = "auto"):
    """The V4 DSpark draft stored as `mtp.*` in a -DSpark release, attached to `target` when given.

    The stage count is the number of distinct `mtp.<s>` prefixes (the root config's
    `num_nextn_predict_layers` says 1 on these releases); missing, unexpected or mis-shaped stage
    tensors are refused by name, with FP8 / FP4 weights dequantised. `kernels`: `ModelConfig.kernels`.
    """
    from dspark.model.draft_v4 import V4DSparkDraft

    config = read_config(path).replace(kernels=kernels)
    raw = raw_config(path)
    with CheckpointReader(path) as reader:
        kind, stages = detect_mtp(reader.keys(), raw)
        if kind != "dspark":
            raise ValueError(f"{path} holds no DSpark stages (its mtp.* namespace is {kind!r})")
        config = config.replace(mtp_kind=kind, num_mtp_layers=stages)
        draft = V4DSparkDraft.empty(config, stages, dtype=dtype, device=device, confidence_pre_norm=confidence_pre_norm)
        load_weights(draft, reader, fp8_block=_fp8_block(raw),
                     sources=lambda name, shape: dspark_stage_sources(name, shape, stages))
    from dspark.model.draft_load import read_sts

    draft.sts_temperatures = read_sts(path)
    return draft.attach(target) if target is not None else draft


def save_dspark_draft(draft, path: str | Path) -> None:
    """Write a V4 DSpark draft as a release would hold it: `mtp.<s>.*` tensors (dequantised) and the
    target config with its dspark_* fields (the target's own tensors are not written)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    stages = len(draft.stages)
    config = config_to_dict(draft.config.replace(mtp_kind="dspark", num_mtp_layers=stages))
    config.pop("quantization_config", None)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = to_upstream(draft.state_dict(), sources=lambda name, shape: dspark_stage_sources(name, shape, stages))
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})


def save_pretrained(model: nn.Module, path: str | Path) -> None:
    """Write `config.json` and `model.safetensors` with upstream names, in the model's dtypes.

    `quantization_config` is dropped: the weights are written dequantised. DSpark stages are not
    part of the model and are not written.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if (path / "model.safetensors.index.json").exists():
        raise ValueError(f"{path} holds a sharded checkpoint index, which would shadow the new model.safetensors")
    config = config_to_dict(model.config)
    config.pop("quantization_config", None)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: t.contiguous() for k, t in to_upstream(model.state_dict()).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
