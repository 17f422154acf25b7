"""Frozen configuration dataclasses: one per concern, presets as named constructors.

`ModelConfig` is the canonical description of a DeepSeek-V4 target. Field names here are
ours; HF field names, legacy upstream names (`compress_ratios`, `num_hash_layers`,
`qk_rope_head_dim`, `rope_scaling`, ...) and the `dspark_*` fields of the -DSpark releases
are translated in `dspark/checkpoint/v4_config.py` and nowhere else.

Vocabulary (deepseek_v4.md): D hidden, N mHC streams, H heads, hd head dim, rd rope dims,
m compression rate, W sliding window, E experts, K experts per token, I expert width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Attention kinds per layer: sliding window only, compressed sparse (CSA, m=4 with the
# lightning indexer) and heavily compressed (HCA, m=128, all entries attended).
LAYER_TYPES = ("sliding", "csa", "hca")
# Router kinds per layer: frozen token-id hash table, or learned scores + correction bias.
MLP_TYPES = ("hash", "score")
# What the checkpoint's `mtp.*` namespace holds.
MTP_KINDS = ("none", "mtp", "dspark")
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid")
ROPE_KINDS = ("default", "yarn")
# Which implementation the modules' ops run: "auto" = the Triton kernels on CUDA inputs, the PyTorch
# references elsewhere; "triton" = the kernels everywhere (on CPU through TRITON_INTERPRET=1);
# "ref" = the references everywhere (e.g. to bisect a GPU mismatch).
KERNELS = ("auto", "triton", "ref")
# Draft module layouts (DraftConfig.kind) and Markov head types (dspark.md §2.1).
DRAFT_KINDS = ("qwen3", "gemma4")
# MLP gate activations (HF names) of the dense targets and the drafts that mirror them.
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


_INT64_MAX = 2**63 - 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RopeConfig:
    """One rotary table. V4 has two: `main` (sliding layers) and `compress` (CSA/HCA)."""

    theta: float
    kind: str = "default"  # "default" | "yarn"
    # YaRN only (deepseek_v4.md §5.2); truncation of the correction range is always on.
    factor: float = 1.0
    original_max_position: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # Multiplies cos/sin. V4 forces 1.0 for YaRN (no mscale) unless a checkpoint says otherwise.
    attention_factor: float = 1.0

    def __post_init__(self):
        if self.kind not in ROPE_KINDS:
            raise ValueError(f"unknown rope kind {self.kind!r}; expected one of {ROPE_KINDS}")
        if not self.theta > 0:
            raise ValueError(f"rope theta must be positive, got {self.theta}")
        if self.kind == "yarn" and (self.factor <= 0 or self.original_max_position <= 0):
            raise ValueError("yarn rope needs factor > 0 and original_max_position > 0")


@dataclass(frozen=True)
class DSparkFields:
    """The `dspark_*` root config fields of DeepSeek's -DSpark releases (dspark_v4.md §1.2)."""

    block_size: int
    noise_token_id: int
    target_layer_ids: tuple[int, ...]
    markov_rank: int


@dataclass(frozen=True)
class ModelConfig:
    # vocabulary and widths
    vocab_size: int
    hidden_size: int  # D
    num_layers: int  # main decoder layers (MTP / draft stages not counted)
    # attention: one shared latent K=V head, grouped low-rank output projection
    num_heads: int  # H
    head_dim: int  # hd, for q, the shared KV and compressed entries
    rope_head_dim: int  # rd, interleaved RoPE on the trailing rd channels
    q_lora_rank: int
    o_groups: int  # G
    o_lora_rank: int  # R, per-group width
    sliding_window: int  # W, including the current token
    layer_types: tuple[str, ...]  # per layer, from LAYER_TYPES
    csa_rate: int  # m of CSA layers
    hca_rate: int  # m of HCA layers
    # lightning indexer (CSA layers)
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    # mHC residual streams
    hc_mult: int  # N
    hc_sinkhorn_iters: int
    hc_eps: float
    rms_norm_eps: float
    # MoE: routed experts + one shared expert of the same width
    mlp_layer_types: tuple[str, ...]  # per layer, from MLP_TYPES
    n_routed_experts: int  # E
    num_experts_per_tok: int  # K
    moe_intermediate_size: int  # I
    scoring_func: str
    routed_scaling_factor: float
    swiglu_limit: float
    # rotary tables: main for sliding layers (and MTP / draft blocks), compress for CSA/HCA
    main_rope: RopeConfig
    compress_rope: RopeConfig
    max_position_embeddings: int
    # what lives under `mtp.*` in the checkpoint
    mtp_kind: str = "none"
    num_mtp_layers: int = 0
    dspark: DSparkFields | None = None
    # tokens
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (1,)
    # extra HF fields carried through unchanged on save (e.g. quantization_config), as JSON text
    extra: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    # how the ops run (KERNELS), not what the model is: never saved, not compared
    kernels: str = field(default="auto", compare=False)

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"invalid ModelConfig: {msg}")

        need(self.kernels in KERNELS, f"kernels {self.kernels!r} not in {KERNELS}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "q_lora_rank",
                     "o_groups", "o_lora_rank", "sliding_window", "csa_rate", "hca_rate", "index_n_heads",
                     "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "n_routed_experts",
                     "num_experts_per_tok", "moe_intermediate_size", "max_position_embeddings"):
            need(_is_int(getattr(self, name)) and 0 < getattr(self, name) <= 2**31,
                 f"{name} must be a positive int (at most 2^31), got {getattr(self, name)!r}")
        # Values that would turn every forward into NaN are refused here, not met as NaN logits.
        for name in ("hc_eps", "rms_norm_eps", "routed_scaling_factor", "swiglu_limit"):
            value = getattr(self, name)
            need(_is_number(value) and 0 < value < float("inf"), f"{name} must be a finite number > 0, got {value!r}")
        need(isinstance(self.tie_word_embeddings, bool),
             f"tie_word_embeddings must be a bool, got {self.tie_word_embeddings!r}")
        need(len(self.layer_types) == self.num_layers,
             f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        need(len(self.mlp_layer_types) == self.num_layers,
             f"mlp_layer_types has {len(self.mlp_layer_types)} entries for {self.num_layers} layers")
        bad = sorted({t for t in self.layer_types if t not in LAYER_TYPES})
        need(not bad, f"unknown layer types {bad}; expected {LAYER_TYPES}")
        bad = sorted({t for t in self.mlp_layer_types if t not in MLP_TYPES})
        need(not bad, f"unknown mlp layer types {bad}; expected {MLP_TYPES}")
        need(self.scoring_func in SCORING_FUNCS,
             f"scoring_func {self.scoring_func!r} not supported; expected one of {SCORING_FUNCS}")
        need(self.rope_head_dim % 2 == 0 and 0 < self.rope_head_dim <= min(self.head_dim, self.index_head_dim),
             f"rope_head_dim {self.rope_head_dim} must be even and fit head_dim and index_head_dim")
        need((self.num_heads * self.head_dim) % self.o_groups == 0 and self.num_heads % self.o_groups == 0,
             f"o_groups {self.o_groups} must divide num_heads {self.num_heads}")
        need(self.num_experts_per_tok <= self.n_routed_experts,
             f"num_experts_per_tok {self.num_experts_per_tok} > n_routed_experts {self.n_routed_experts}")
        need(self.mtp_kind in MTP_KINDS, f"mtp_kind {self.mtp_kind!r} not in {MTP_KINDS}")
        need(self.num_mtp_layers >= 0, "num_mtp_layers must be >= 0")
        need((self.mtp_kind == "none") == (self.num_mtp_layers == 0),
             f"mtp_kind {self.mtp_kind!r} with {self.num_mtp_layers} mtp layers")
        need(self.mtp_kind != "dspark" or self.dspark is not None, "mtp_kind 'dspark' needs the dspark_* fields")
        for t in self.eos_token_ids:
            need(0 <= t < self.vocab_size, f"eos token {t} outside the vocabulary")

    # ------------------------------------------------------------------ derived values
    def compress_rate(self, layer: int) -> int:
        """m of a layer (0 for sliding-only layers)."""
        kind = self.layer_types[layer]
        return {"sliding": 0, "csa": self.csa_rate, "hca": self.hca_rate}[kind]

    @property
    def has_mtp(self) -> bool:
        return self.mtp_kind == "mtp"

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def truncated(self, num_layers: int) -> "ModelConfig":
        """The same shapes with only the first `num_layers` layers (flash-proxy style)."""
        if not 0 < num_layers <= self.num_layers:
            raise ValueError(f"num_layers override {num_layers} must be in 1..{self.num_layers}")
        return self.replace(num_layers=num_layers, layer_types=self.layer_types[:num_layers],
                            mlp_layer_types=self.mlp_layer_types[:num_layers])

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """Every attention and MLP type in four layers with small, odd dims (tests).

        32 indexer heads keep exact index-score ties unlikely (deepseek_v4.md §9.4); the HCA rate
        is 16 so a 64-token test crosses several HCA windows; YaRN's original length is 64 so
        some compress-table pairs really are rescaled.
        """
        base = dict(
            vocab_size=509, hidden_size=56, num_layers=4,
            num_heads=4, head_dim=24, rope_head_dim=8, q_lora_rank=40, o_groups=2, o_lora_rank=12,
            sliding_window=16, layer_types=("sliding", "csa", "hca", "csa"), csa_rate=4, hca_rate=16,
            index_n_heads=32, index_head_dim=16, index_topk=4,
            hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6,
            mlp_layer_types=("hash", "hash", "score", "score"), n_routed_experts=8, num_experts_per_tok=2,
            moe_intermediate_size=20, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=10.0,
            main_rope=RopeConfig(theta=10000.0),
            compress_rope=RopeConfig(theta=160000.0, kind="yarn", factor=16.0, original_max_position=64),
            max_position_embeddings=1024, mtp_kind="mtp", num_mtp_layers=1,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def flash(cls, **overrides) -> "ModelConfig":
        """DeepSeek-V4-Flash shapes (published config.json, deepseek_v4.md §2.1)."""
        layer_types = ("sliding", "sliding") + ("csa", "hca") * 20 + ("csa",)
        base = dict(
            vocab_size=129280, hidden_size=4096, num_layers=43,
            num_heads=64, head_dim=512, rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024,
            sliding_window=128, layer_types=layer_types, csa_rate=4, hca_rate=128,
            index_n_heads=64, index_head_dim=128, index_topk=512,
            hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6,
            mlp_layer_types=("hash",) * 3 + ("score",) * 40, n_routed_experts=256, num_experts_per_tok=6,
            moe_intermediate_size=2048, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5, swiglu_limit=10.0,
            main_rope=RopeConfig(theta=10000.0),
            compress_rope=RopeConfig(theta=160000.0, kind="yarn", factor=16.0, original_max_position=65536),
            max_position_embeddings=1048576, mtp_kind="mtp", num_mtp_layers=1,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def flash_proxy(cls, num_layers: int = 4, **overrides) -> "ModelConfig":
        """V4-Flash layer shapes with few layers and random weights (GPU timing)."""
        return cls.flash(**overrides).truncated(num_layers)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        presets = {"tiny": cls.tiny, "flash": cls.flash, "flash-proxy": cls.flash_proxy}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; known presets: {sorted(presets)}")
        return presets[name]()


_DRAFT_INT_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
               "vocab_size", "block_size", "num_target_layers", "target_hidden_size", "max_position_embeddings")
_DRAFT_BOOL_FIELDS = ("has_confidence_head", "confidence_with_markov", "confidence_bias")


def _check_gemma4_deltas(cfg, need) -> None:
    """The Gemma 4 backbone fields DraftConfig and Eagle3Config share (same names, same meaning)."""
    need(cfg.hidden_act in ACTIVATIONS, f"hidden_act {cfg.hidden_act!r} not in {ACTIVATIONS}")
    for name in ("attention_scale", "logit_softcap"):
        value = getattr(cfg, name)
        need(value is None or (_is_number(value) and value > 0),
             f"{name} must be None or a positive number, got {value!r}")
    need(_is_number(cfg.rope_fraction) and 0 < cfg.rope_fraction <= 1,
         f"rope_fraction must lie in (0, 1], got {cfg.rope_fraction!r}")
    need(_is_number(cfg.embed_scale) and cfg.embed_scale > 0,
         f"embed_scale must be a positive number, got {cfg.embed_scale!r}")
    for name in ("k_eq_v", "value_norm", "sandwich_norms"):
        need(isinstance(getattr(cfg, name), bool), f"{name} must be a bool, got {getattr(cfg, name)!r}")


@dataclass(frozen=True)
class DraftConfig:
    """Shapes and switches of a block drafter (dspark.md §1.1); `kind` names the module layout."""

    # layout: DeepSpec's "qwen3" Qwen3DSparkModel or "gemma4" Gemma4DSparkModel (DSpark and DFlash alike); it
    # names the checkpoint format, the fields below say what the module computes
    kind: str
    # backbone (Qwen3 decoder layers, full attention)
    hidden_size: int  # d (= the target's for DeepSpec drafts)
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # H_kv
    head_dim: int  # hd
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float  # Qwen3 rotate-half RoPE, default rope type
    vocab_size: int  # V: the full target vocabulary, no draft-vocabulary reduction
    # block drafting
    block_size: int  # γ: anchor + γ−1 MASK rows, γ draft tokens per round
    mask_token_id: int
    # context features: concat of the raw outputs of these target layers (-1 = embedding output)
    target_layer_ids: tuple[int, ...]
    num_target_layers: int
    target_hidden_size: int
    # sequential (Markov) head; rank 0 = DFlash (no head)
    markov_rank: int = 0
    markov_head_type: str = "vanilla"  # "vanilla" | "gated" | "rnn"
    # confidence head: z = proj([h ; W1[prev]]) (or proj(h) without the Markov embedding)
    has_confidence_head: bool = False
    confidence_with_markov: bool = False
    confidence_bias: bool = True
    max_position_embeddings: int = 40960
    # Gemma 4 backbone deltas; the defaults are the Qwen3 layout
    hidden_act: str = "silu"  # MLP gate activation (ACTIVATIONS)
    attention_scale: float | None = None  # softmax scale of q·k; None = head_dim ** -0.5 (Gemma 4: 1.0)
    rope_fraction: float = 1.0  # share of the hd/2 RoPE pairs rotated, frequencies over hd (Gemma 4 "proportional")
    k_eq_v: bool = False  # values are the raw k_proj output: no v_proj (Gemma 4 attention_k_eq_v)
    value_norm: bool = False  # scale-free RMSNorm over head_dim on the values (Gemma 4 v_norm)
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too, and a per-layer layer_scalar
    embed_scale: float = 1.0  # token embeddings × this, rounded to the weights' dtype (Gemma: sqrt(d))
    logit_softcap: float | None = None  # U = cap · tanh(lm_head(h) / cap) (Gemma final_logit_softcapping)
    # how the ops run (dspark.config.KERNELS), not what the draft is: never saved, not compared
    kernels: str = field(default="auto", compare=False)

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"invalid DraftConfig: {msg}")

        need(self.kernels in KERNELS, f"kernels {self.kernels!r} not in {KERNELS}")
        need(self.kind in DRAFT_KINDS, f"kind {self.kind!r} not in {DRAFT_KINDS}")
        for name in _DRAFT_INT_FIELDS:
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive int, got {value!r}")
        for name in _DRAFT_BOOL_FIELDS:
            need(isinstance(getattr(self, name), bool), f"{name} must be a bool, got {getattr(self, name)!r}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        need(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even (rotate-half RoPE)")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta!r}")
        need(isinstance(self.mask_token_id, int) and 0 <= self.mask_token_id < self.vocab_size,
             f"mask_token_id {self.mask_token_id!r} outside the vocabulary [0, {self.vocab_size})")
        taps = self.target_layer_ids
        need(isinstance(taps, tuple) and len(taps) > 0 and all(isinstance(t, int) for t in taps),
             f"target_layer_ids must be a non-empty tuple of ints, got {taps!r}")
        need(all(a < b for a, b in zip(taps, taps[1:])), f"target_layer_ids {taps} must be strictly increasing")
        # The last target layer is never tapped: HF's hidden_states replaces its raw output by the
        # final-normed state, so train and eval features would disagree (dspark.md §1.2).
        last = self.num_target_layers - 1
        need(all(t == -1 or 0 <= t < last for t in taps),
             f"target_layer_ids {taps} must lie in {{-1}} ∪ [0, {last - 1}] (-1 = embedding output; the last "
             f"target layer {last} may not be tapped)")
        need(isinstance(self.markov_rank, int) and self.markov_rank >= 0,
             f"markov_rank must be an int >= 0, got {self.markov_rank!r}")
        need(self.markov_head_type in MARKOV_HEAD_TYPES,
             f"markov_head_type {self.markov_head_type!r} not in {MARKOV_HEAD_TYPES}")
        need(not self.confidence_with_markov or (self.has_confidence_head and self.markov_rank > 0),
             "confidence_with_markov needs has_confidence_head and markov_rank > 0")
        _check_gemma4_deltas(self, need)

    @property
    def context_width(self) -> int:
        """F: width of one context feature row."""
        return len(self.target_layer_ids) * self.target_hidden_size

    @property
    def has_markov_head(self) -> bool:
        return self.markov_rank > 0

    @classmethod
    def tiny(cls, **overrides) -> "DraftConfig":
        """A small DSpark config with odd dims for tests (vanilla head, confidence head)."""
        base = dict(
            kind="qwen3", hidden_size=40, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12,
            intermediate_size=56, rms_norm_eps=1e-6, rope_theta=10000.0, vocab_size=67, block_size=5,
            mask_token_id=61, target_layer_ids=(0, 2), num_target_layers=4, target_hidden_size=24,
            markov_rank=6, markov_head_type="vanilla", has_confidence_head=True, confidence_with_markov=True,
            max_position_embeddings=256,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def tiny_gemma4(cls, **overrides) -> "DraftConfig":
        """`tiny` in DeepSpec's Gemma 4 layout (attention_k_eq_v, partial RoPE, soft-capped logits)."""
        base = dict(kind="gemma4", num_kv_heads=1, hidden_act="gelu_pytorch_tanh", attention_scale=1.0,
                    rope_fraction=0.25, k_eq_v=True, value_norm=True, sandwich_norms=True,
                    embed_scale=40 ** 0.5, logit_softcap=15.0)
        return cls.tiny(**{**base, **overrides})


@dataclass(frozen=True)
class Eagle3Config:
    """Shapes and switches of an EAGLE-3 draft (dspark.draft.eagle3; DeepSpec's config.json names in comments)."""

    # layout: DeepSpec's "qwen3" Qwen3Eagle3Model or "gemma4" Gemma4Eagle3Model; it names the checkpoint
    # format, the fields below say what the module computes
    kind: str
    # backbone: the one decoder layer over [embedding ; hidden] rows
    hidden_size: int  # d, the target's hidden size too (fc reads taps × d)
    num_heads: int  # num_attention_heads
    num_kv_heads: int  # num_key_value_heads (Gemma 4 k_eq_v: num_global_key_value_heads)
    head_dim: int  # Gemma 4: global_head_dim
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float  # rope_parameters(.full_attention).rope_theta
    vocab_size: int  # the target's vocabulary (no draft-vocabulary maps d2t / t2d)
    # context features and chain
    target_layer_ids: tuple[int, ...]  # taps: raw outputs of these target layers, concatenated
    num_target_layers: int
    ttt_length: int  # γ: tokens chained per round (training's test-time-training length)
    max_position_embeddings: int = 40960
    # Gemma 4 backbone deltas, as DraftConfig's; the defaults are the Qwen3 layout
    hidden_act: str = "silu"  # MLP gate activation (ACTIVATIONS)
    attention_scale: float | None = None  # softmax scale of q·k; None = head_dim ** -0.5 (Gemma 4: 1.0)
    rope_fraction: float = 1.0  # share of the hd/2 RoPE pairs rotated, frequencies over hd (Gemma 4 "proportional")
    k_eq_v: bool = False  # values are the raw k_proj output: no v_proj (Gemma 4 attention_k_eq_v)
    value_norm: bool = False  # scale-free RMSNorm over head_dim on the values (Gemma 4 v_norm)
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too, and a layer_scalar
    embed_scale: float = 1.0  # token embeddings × this, rounded to the weights' dtype (Gemma: sqrt(d))
    logit_softcap: float | None = None  # cap · tanh(logits / cap) (Gemma final_logit_softcapping)

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"invalid Eagle3Config: {msg}")

        need(self.kind in DRAFT_KINDS, f"kind {self.kind!r} not in {DRAFT_KINDS}")
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size",
                     "num_target_layers", "ttt_length", "max_position_embeddings"):
            value = getattr(self, name)
            need(_is_int(value) and value > 0, f"{name} must be a positive int, got {value!r}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        need(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even (rotate-half RoPE)")
        need(self.rms_norm_eps > 0, f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta!r}")
        _check_gemma4_deltas(self, need)
        taps = self.target_layer_ids
        need(isinstance(taps, tuple) and len(taps) > 0 and all(_is_int(t) for t in taps),
             f"target_layer_ids must be a non-empty tuple of ints, got {taps!r}")
        need(all(a < b for a, b in zip(taps, taps[1:])), f"target_layer_ids {taps} must be strictly increasing")
        # The last target layer is never tapped: HF's hidden_states holds its final-normed state, not
        # its raw output (DeepSpec's assert_no_final_target_layer).
        need(all(0 <= t < self.num_target_layers - 1 for t in taps),
             f"target_layer_ids {taps} must lie in [0, {self.num_target_layers - 1}) "
             f"(num_target_layers {self.num_target_layers}; the last layer is not tappable)")

    @property
    def context_width(self) -> int:
        return len(self.target_layer_ids) * self.hidden_size


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling parameters (architecture.md §9), checked when constructed: every value
    must fit the tensor it is written to (int64, fp32) so a request never fails after admission.
    Stop token ids are checked against the vocabulary by `Engine.add_request`."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off; keeps every token tied with the k-th
    top_p: float = 1.0  # 1 = off; keeps the crossing token and its ties
    seed: int | None = None  # None: a fresh random seed per request
    stop_token_ids: tuple[int, ...] = ()
    max_tokens: int = 16

    def __post_init__(self):
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= _INT64_MAX:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature < 3e38:  # fp32, finite
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        # Floats from here on: an integer temperature of 2**63 is a (huge) float, not an int64 overflow.
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        if not _is_int(self.top_k) or not 0 <= self.top_k <= _INT64_MAX:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed <= _INT64_MAX):
            raise ValueError(f"seed must be a non-negative 64-bit integer, got {self.seed!r}")
        if not isinstance(self.stop_token_ids, (tuple, list)) or not all(_is_int(t) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be integers (a list or tuple), got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))  # frozen: hashable, never aliased


@dataclass(frozen=True)
class EngineConfig:
    """How an `Engine` is sized and how it decodes (dspark.decode.engine). The method and its draft
    are arguments of the engine, not fields here; the SPS table is measured by the caller
    (`dspark.decode.sps.engine_sps`, `dspark sps`) and passed in."""

    # sizes: slots, positions per request, prefill chunk, KV pages
    max_batch: int = 8
    max_seq_len: int | None = None  # None: min(the target's positions, 4096)
    prefill_chunk: int = 512
    memory_budget: int | None = None  # bytes for the KV cache; None: enough for max_batch × max_seq_len
    page_size: int | None = None
    token_bucket: int = 1  # verify / prefill rows padded to a multiple of this (fewer graph shapes)
    max_stop_tokens: int = 8
    # drafting and verification
    num_draft_tokens: int | None = None  # None: the method's own; with a trained draft: verify at most this many
    scheduler: str = "fixed"  # dspark.decode.schedule.SCHEDULERS
    threshold: float = 0.0  # the threshold schedulers' cut
    sps: tuple[float, ...] | None = None  # steps/s per verify batch size B = 0..Bmax (hardware, async)
    adapt: bool = False  # correct confidences online from observed acceptances (dspark.decode.adapt)
    # execution and recording
    cuda_graphs: bool = False
    # decode rounds through torch.compile (inductor, C++) on CPU (dspark.decode.compiled); None: on when
    # the device is a CPU, the target runs the reference kernels and a C++ compiler is found. Off by
    # default: a cold compile costs minutes per round shape on 2 cores (compiled.py has the numbers)
    compile: bool | None = False
    record_proposals: bool = False  # read every round's drafts back (tests, acceptance studies)

    def __post_init__(self):
        # Upper bounds keep a typo from allocating the machine away: slots, stop lists and padded rows
        # are allocated (or padded to) at these sizes.
        for name, top in (("max_batch", 4096), ("prefill_chunk", 2**20), ("token_bucket", 4096),
                          ("max_stop_tokens", 1024)):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= top:
                raise ValueError(f"{name} must be an integer in [1, {top}], got {value!r}")
        for name in ("max_seq_len", "memory_budget", "page_size"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 1 <= value <= _INT64_MAX):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.num_draft_tokens is not None and (not _is_int(self.num_draft_tokens) or
                                                  not 0 <= self.num_draft_tokens <= 1024):
            raise ValueError(f"num_draft_tokens must be an integer in [0, 1024] or None, got {self.num_draft_tokens!r}")
        if not isinstance(self.scheduler, str):
            raise ValueError(f"scheduler must be a name, got {self.scheduler!r}")
        if not _is_number(self.threshold) or not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        if self.sps is not None:
            if not isinstance(self.sps, (tuple, list)) or not all(_is_number(v) for v in self.sps):
                raise ValueError("sps must be a sequence of steps/s per verify batch size")
            object.__setattr__(self, "sps", tuple(self.sps))  # frozen: hashable, never aliased
        for name in ("adapt", "cuda_graphs", "record_proposals"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.compile is not None and not isinstance(self.compile, bool):
            raise ValueError(f"compile must be a bool or None (auto), got {self.compile!r}")
        if self.compile and self.cuda_graphs:
            raise ValueError("compile=True and cuda_graphs=True: compiled rounds are the CPU path, CUDA graphs "
                             "the GPU one")

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TrainConfig:
    """Draft training (dspark.md §4.5 defaults, scaled by the caller)."""

    steps: int = 300
    batch_size: int = 8  # sequences per optimizer step
    seq_len: int = 128
    num_anchors: int = 16  # blocks per sequence
    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_frac: float = 0.04  # linear warmup over this share of the steps, then cosine to 0
    grad_clip: float = 1.0  # global norm
    seed: int = 42
    checkpoint_every: int = 100
    log_every: int = 1

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "num_anchors", "checkpoint_every", "log_every"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0 or not 0 <= self.warmup_frac < 1 or not self.grad_clip > 0:
            raise ValueError("need lr > 0, 0 <= warmup_frac < 1 and grad_clip > 0")

    def lr_at(self, step: int) -> float:
        """Linear warmup (lr·(step+1)/warmup), then cosine from lr to 0 over the remaining steps."""
        import math

        warmup = int(self.warmup_frac * self.steps)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(self.steps - warmup, 1)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# Dense HF targets (dspark.model.dense): the families, their attention kinds per layer and rotary kinds
# (HF's rope_type names); their MLP activations are ACTIVATIONS.
DENSE_FAMILIES = ("qwen3", "llama", "gemma4")
DENSE_LAYER_TYPES = ("full", "sliding")
DENSE_ROPE_KINDS = ("default", "llama3", "proportional")


@dataclass(frozen=True)
class DenseRope:
    """One NeoX (rotate-half) rotary table over a whole head, as HF's rope_parameters describe it."""

    theta: float
    kind: str = "default"  # DENSE_ROPE_KINDS
    # proportional: the first ⌊factor·hd/2⌋ frequency pairs rotate, the rest get frequency 0
    partial_rotary_factor: float = 1.0
    # llama3 and proportional: inverse frequencies divided by `factor` (llama3 only below low_freq_wavelen)
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 0

    def __post_init__(self):
        if self.kind not in DENSE_ROPE_KINDS:
            raise ValueError(f"unknown rope kind {self.kind!r}; expected one of {DENSE_ROPE_KINDS}")
        if not (_is_number(self.theta) and 0 < self.theta < float("inf")):
            raise ValueError(f"rope theta must be a finite number > 0, got {self.theta!r}")
        if not (_is_number(self.factor) and self.factor > 0):
            raise ValueError(f"rope factor must be > 0, got {self.factor!r}")
        if not (_is_number(self.partial_rotary_factor) and 0 < self.partial_rotary_factor <= 1):
            raise ValueError(f"rope partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        if self.partial_rotary_factor != 1 and self.kind != "proportional":
            raise ValueError(f"rope partial_rotary_factor {self.partial_rotary_factor} is only implemented for "
                             "the 'proportional' kind")
        if self.kind == "llama3" and not (self.original_max_position > 0
                                          and 0 < self.low_freq_factor < self.high_freq_factor):
            raise ValueError("llama3 rope needs original_max_position > 0 and 0 < low_freq_factor < high_freq_factor")


@dataclass(frozen=True)
class DenseConfig:
    """A dense HF decoder (Qwen3, Llama-3, Gemma 4 text): pre-norm GQA attention + gated MLP per layer.

    Family differences are named switches, not branches on `family`, so one module body serves all
    three; `dspark.checkpoint.hf` translates config.json into them. Vocabulary: D hidden, H / Hkv
    query and KV heads, hd head dim, I MLP width, W sliding window (including the current token).
    """

    family: str  # DENSE_FAMILIES, for messages and saving
    # widths
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # I
    num_layers: int
    # attention: GQA; Gemma 4's full-attention layers may widen the head and change the KV heads
    num_heads: int  # H
    num_kv_heads: int  # Hkv
    head_dim: int  # hd
    layer_types: tuple[str, ...]  # per layer, DENSE_LAYER_TYPES
    rope: DenseRope  # full-attention layers (every layer unless sliding_rope is set)
    max_position_embeddings: int
    sliding_window: int | None = None  # W of "sliding" layers
    sliding_rope: DenseRope | None = None  # sliding layers' table when it differs (Gemma 4)
    global_head_dim: int | None = None  # hd of full layers when it differs (Gemma 4)
    global_num_kv_heads: int | None = None  # Hkv of full layers when it differs (Gemma 4)
    attention_k_eq_v: bool = False  # full layers take V from k_proj (no v_proj; Gemma 4)
    attention_scale: float | None = None  # query scale; None = hd^-1/2 (Gemma 4: 1, its q_norm scales)
    # norms and biases
    rms_norm_eps: float = 1e-6
    qk_norm: bool = False  # per-head weighted RMSNorm of q and k before RoPE (Qwen3, Gemma 4)
    v_norm: bool = False  # per-head unweighted RMSNorm of v (Gemma 4)
    sandwich_norms: bool = False  # norms after attention and MLP too, then ×layer_scalar (Gemma 4)
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"  # ACTIVATIONS
    # embedding and head
    embed_scale: float | None = None  # embeddings × this, rounded to the weight dtype (Gemma: sqrt(D))
    final_logit_softcapping: float | None = None  # logits = c·tanh(logits / c)
    tie_word_embeddings: bool = False
    # tokens
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # the engine reads `dspark` (V4 -DSpark fields) on every target; dense targets have none
    dspark: None = None
    # how the ops run (KERNELS), not what the model is: never saved, not compared
    kernels: str = field(default="auto", compare=False)

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"invalid DenseConfig: {msg}")

        need(self.family in DENSE_FAMILIES, f"family {self.family!r} not in {DENSE_FAMILIES}")
        need(self.kernels in KERNELS, f"kernels {self.kernels!r} not in {KERNELS}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            need(_is_int(getattr(self, name)) and 0 < getattr(self, name) <= 2**31,
                 f"{name} must be a positive int (at most 2^31), got {getattr(self, name)!r}")
        for name in ("sliding_window", "global_head_dim", "global_num_kv_heads"):
            value = getattr(self, name)
            need(value is None or (_is_int(value) and 0 < value <= 2**31),
                 f"{name} must be None or a positive int, got {value!r}")
        for name in ("rms_norm_eps", "attention_scale", "embed_scale", "final_logit_softcapping"):
            value = getattr(self, name)
            need(value is None and name != "rms_norm_eps" or _is_number(value) and 0 < value < float("inf"),
                 f"{name} must be a finite number > 0, got {value!r}")
        for name in ("attention_k_eq_v", "qk_norm", "v_norm", "sandwich_norms", "attention_bias", "mlp_bias",
                     "tie_word_embeddings"):
            need(isinstance(getattr(self, name), bool), f"{name} must be a bool, got {getattr(self, name)!r}")
        need(self.hidden_act in ACTIVATIONS, f"hidden_act {self.hidden_act!r} not in {ACTIVATIONS}")
        need(len(self.layer_types) == self.num_layers,
             f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        bad = sorted({t for t in self.layer_types if t not in DENSE_LAYER_TYPES})
        need(not bad, f"unknown layer types {bad}; expected {DENSE_LAYER_TYPES}")
        need("sliding" not in self.layer_types or self.sliding_window is not None,
             "sliding layers need a sliding_window")
        for i in range(self.num_layers):
            hd, kv = self.layer_head_dim(i), self.layer_kv_heads(i)
            need(hd % 2 == 0, f"layer {i}: head_dim {hd} must be even (rotate-half RoPE)")
            need(self.num_heads % kv == 0, f"layer {i}: num_heads {self.num_heads} not a multiple of kv heads {kv}")
        need(self.dspark is None, "dense targets carry no dspark_* fields")
        for t in self.eos_token_ids:
            need(_is_int(t) and 0 <= t < self.vocab_size, f"eos token {t!r} outside the vocabulary")
        need(self.bos_token_id is None or _is_int(self.bos_token_id) and 0 <= self.bos_token_id < self.vocab_size,
             f"bos_token_id {self.bos_token_id!r} outside the vocabulary")

    # ------------------------------------------------------------------ per-layer values
    def is_global(self, layer: int) -> bool:
        return self.layer_types[layer] == "full"

    def layer_head_dim(self, layer: int) -> int:
        return self.global_head_dim if self.is_global(layer) and self.global_head_dim else self.head_dim

    def layer_kv_heads(self, layer: int) -> int:
        return self.global_num_kv_heads if self.is_global(layer) and self.global_num_kv_heads else self.num_kv_heads

    def layer_rope(self, layer: int) -> DenseRope:
        return self.rope if self.is_global(layer) or self.sliding_rope is None else self.sliding_rope

    def layer_window(self, layer: int) -> int | None:
        return None if self.is_global(layer) else self.sliding_window

    def layer_k_eq_v(self, layer: int) -> bool:
        return self.attention_k_eq_v and self.is_global(layer)

    def layer_scale(self, layer: int) -> float:
        return self.attention_scale if self.attention_scale is not None else self.layer_head_dim(layer) ** -0.5

    def replace(self, **changes) -> "DenseConfig":
        return dataclasses.replace(self, **changes)

    def truncated(self, num_layers: int) -> "DenseConfig":
        """The same shapes with only the first `num_layers` layers."""
        if not 0 < num_layers <= self.num_layers:
            raise ValueError(f"num_layers override {num_layers} must be in 1..{self.num_layers}")
        return self.replace(num_layers=num_layers, layer_types=self.layer_types[:num_layers])
