"""DeepSeek-V4 checkpoints: tensor names, loading and saving targets and V4-layout DSpark drafts.

Layouts (architecture.md §9): (a) HF's in-memory `DeepseekV4ForCausalLM` names, which are the
model's own names (identity mapping); (b) upstream DeepSeek names (deepseek_v4.md §13.2), per-expert
`w1/w2/w3` matrices, int32 `tid2eid`, FP8 e4m3 weights with 128×128 UE8M0 `.scale` siblings and
FP4 routed experts, in one file or sharded behind `model.safetensors.index.json`.

Loading is driven by the model: every tensor of `model.state_dict()` names the checkpoint tensors it
is built from (exact names, never substring rules, so `markov_w1` is never mistaken for an expert
`w1`), and every checkpoint tensor must be claimed by one of them. Missing, unexpected and
mis-shaped tensors are all reported before anything is read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, NamedTuple

import torch
from safetensors.torch import save_file
from torch import nn

from dspark.checkpoint.reader import (CheckpointReader, describe, fp8_block_of, listing, raw_config, read_sts,
                                      read_tensor, scale_key)
from dspark.checkpoint.v4_config import DSPARK_FIELDS, HF_DEFAULTS, config_to_dict, read_config
from dspark.draft.v4 import V4DSparkDraft
from dspark.model.parallel import Parallel, module_shapes, shard, shard_dims
from dspark.model.target import DeepseekV4

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
    """The release tensors that build draft tensor `name` (`dspark.draft.v4.V4DSparkDraft`)."""
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
        missing = [k for k in DSPARK_FIELDS if raw_config.get(k) is None]
        if missing:
            raise ValueError(f"checkpoint holds DSpark stages (mtp.0.main_proj.weight) but config.json lacks {missing}")
        return "dspark", len(stages)
    if rels & {"e_proj.weight", "enorm.weight", "hnorm.weight"}:
        return "mtp", len(stages)
    raise ValueError(f"unrecognised mtp.* tensors (neither an MTP module nor DSpark stages), e.g. {sorted(mtp)[:5]}")


def read_mtp_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's `mtp.*` tensors under their checkpoint names, FP8/FP4 dequantised; floating
    tensors as float32 (for the DSpark draft, which is not part of `DeepseekV4`)."""
    block = fp8_block_of(raw_config(path))
    out = {}
    with CheckpointReader(path) as reader:
        keys = set(reader.keys())
        scales = {scale_key(k) for k in keys} & keys
        for key in sorted(k for k in keys if k.startswith("mtp.") and k not in scales):
            describe(reader, key, block)  # validates scale shapes and dtypes
            t = read_tensor(reader, key, block)
            out[key] = t.float() if t.is_floating_point() else t
    return out



# ============================================================================ loading and saving
def load_weights(model: nn.Module, checkpoint: str | Path | CheckpointReader, *, num_layers: int | None = None,
                 load_mtp: bool = True, fp8_block: tuple[int, int] = (128, 128), sources=None,
                 parallel: Parallel = Parallel.single(), full: nn.Module | None = None) -> None:
    """Copy a checkpoint into `model` (HF tensor names), strictly, one tensor at a time.

    Checkpoint tensors of layers >= `num_layers`, and all `mtp.*` tensors unless `load_mtp`, are
    skipped. Every other tensor must be claimed by a model tensor and every model tensor must be
    found, with matching shapes and compatible dtypes; otherwise ValueError lists the offenders
    before anything is copied. `sources(name, shape)` replaces the name mapping for models that
    read only the `mtp.*` namespace (the V4 DSpark draft); everything else is then skipped.

    Sharded (`parallel` with world > 1): `model` is rank `parallel.rank`'s shard of `full`, the
    single-process model (on the meta device is fine), which the checkpoint is checked against; only
    this rank's blocks are copied (dspark.model.parallel). A routed expert's tensors are read only by
    the rank that owns it; another sharded tensor is read whole, one at a time, and cut.
    TODO(#18): read just the owned rows through safetensors' get_slice (CheckpointReader has no
    slice read yet; FP8 block scales need the covering block rows).
    """
    if not isinstance(checkpoint, CheckpointReader):
        with CheckpointReader(checkpoint) as reader:
            return load_weights(model, reader, num_layers=num_layers, load_mtp=load_mtp, fp8_block=fp8_block,
                                sources=sources, parallel=parallel, full=full)
    reader, state, full = checkpoint, model.state_dict(), model if full is None else full
    plan = plan_weights(full, reader, num_layers=num_layers, load_mtp=load_mtp, fp8_block=fp8_block,
                        sources=sources)
    dims = shard_dims(module_shapes(full), module_shapes(model), parallel.world)
    with torch.no_grad():
        for name, srcs in plan.items():
            # Stacked experts split along dim 0: this rank's first expert.
            first = parallel.rank * state[name].shape[0] if dims[name] == 0 else 0
            for src in srcs:
                if src.part is None:
                    state[name].copy_(shard(read_tensor(reader, src.key, fp8_block), dims[name], parallel))
                elif 0 <= src.expert - first < state[name].shape[0]:  # another rank's expert: never read
                    _expert_slice(state[name], src._replace(expert=src.expert - first)).copy_(
                        read_tensor(reader, src.key, fp8_block))


def plan_weights(model: nn.Module, reader: CheckpointReader, *, num_layers: int | None = None,
                 load_mtp: bool = True, fp8_block: tuple[int, int] = (128, 128), sources=None
                 ) -> dict[str, list[Source]]:
    """Which checkpoint tensors fill each model tensor, after checking them all (see `load_weights`);
    reads headers only, so it runs on a model built on the meta device before any memory is taken."""
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
    return plan


def _problems(reader: CheckpointReader, state: dict[str, torch.Tensor], plan: dict[str, list[Source]],
              skipped, fp8_block: tuple[int, int]) -> list[str]:
    """Every reason `plan` cannot fill `state` from `reader`, one section per kind (empty if none)."""
    claimed = {src.key for srcs in plan.values() for src in srcs}
    scales = {scale_key(k) for k in claimed} & set(reader.keys())
    unexpected = [k for k in reader.keys() if k not in claimed and k not in scales and not skipped(k)]
    missing, misshaped, bad = [], [], []
    for name, srcs in plan.items():
        param = state[name]
        for src in srcs:
            if src.key not in reader:
                missing.append(src.key)
                continue
            try:
                stored = describe(reader, src.key, fp8_block)
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
    return [f"{len(v)} {what}: {listing(v)}" for what, v in
            (("missing tensors", missing), ("unexpected tensors", unexpected), ("mis-shaped tensors", misshaped),
             ("bad tensors", bad)) if v]


def _num_experts(state: dict[str, torch.Tensor], tid2eid_name: str) -> int:
    return state[tid2eid_name[: -len("tid2eid")] + "weight"].shape[0]  # the router's [E, D] weight


def check_sizes(raw: dict, reader: CheckpointReader) -> None:
    """The sizes config.json claims (layers, vocabulary, hidden size, experts) against what the tensor
    headers hold, before a model is sized by them: a lying config is refused here instead of
    allocating terabytes or building a billion layers first."""
    where = f"{reader.path}: config.json"
    layers = {int(m.group(2)) for k in reader.keys() if (m := _BLOCK_PREFIX.match(k)) and m.group(1) != "mtp"}
    claimed = raw.get("num_hidden_layers", HF_DEFAULTS["num_hidden_layers"])
    if not isinstance(claimed, int) or isinstance(claimed, bool) or claimed != len(layers) or \
            layers != set(range(len(layers))):
        shown = f"layers 0..{max(layers)}" if layers else "no layers"
        raise ValueError(f"{where} says num_hidden_layers {claimed!r}, but its tensors hold {shown}"
                         + ("" if layers == set(range(len(layers))) else " with gaps"))
    embed = next((k for k in ("model.embed_tokens.weight", "embed.weight") if k in reader), None)
    if embed is None:
        raise ValueError(f"{reader.path}: no embedding tensor (model.embed_tokens.weight or embed.weight)")
    shape = reader.shape(embed)
    for field, size in (("vocab_size", shape[0]), ("hidden_size", shape[-1])):
        value = raw.get(field, HF_DEFAULTS[field])
        if not isinstance(value, int) or isinstance(value, bool) or value != size:
            raise ValueError(f"{where} says {field} {value!r}, but {embed} is {list(shape)}")


def load_target(path: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               num_layers: int | None = None, kernels: str = "auto", parallel: Parallel = Parallel.single()):
    """Build a `DeepseekV4` from a checkpoint directory (HF names, upstream names, or sharded FP8/FP4).

    `config.mtp_kind` follows the checkpoint's `mtp.*` tensors: an MTP module is built and loaded;
    DSpark stages are not modules (read them with `read_mtp_state`). `num_layers` builds only the
    first layers and skips the rest; `mtp.*` is then skipped too, since it continues the full-depth
    model. Weights are allocated once in `dtype` (fp32 islands stay fp32). `kernels`: `ModelConfig.kernels`.
    `parallel`: build and fill only this rank's shard (`load_weights`).
    """
    raw = raw_config(path)
    with CheckpointReader(path) as reader:
        check_sizes(raw, reader)  # before the config builds anything from them
        config = read_config(path).replace(kernels=kernels)
        kind, stages = detect_mtp(reader.keys(), raw)
        config = config.replace(mtp_kind=kind, num_mtp_layers=stages)
        truncated = num_layers is not None and num_layers != config.num_layers
        if truncated:
            config = config.truncated(num_layers).replace(mtp_kind="none", num_mtp_layers=0)
        kw = dict(num_layers=num_layers if truncated else None, load_mtp=config.mtp_kind == "mtp",
                  fp8_block=fp8_block_of(raw))
        try:
            with torch.device("meta"):  # every shape checked against the headers before memory is taken
                meta = DeepseekV4(config)
        except (RuntimeError, TypeError, ValueError, OverflowError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{reader.path}: config.json's sizes build no model ({first})") from None
        plan_weights(meta, reader, **kw)
        model = DeepseekV4.empty(config, dtype=dtype, device=device, parallel=parallel)
        load_weights(model, reader, **kw, parallel=parallel, full=meta)
    return model


def load_v4_draft(path: str | Path, target=None, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", confidence_pre_norm: bool = True, kernels: str = "auto"):
    """The V4 DSpark draft stored as `mtp.*` in a -DSpark release, attached to `target` when given.

    The stage count is the number of distinct `mtp.<s>` prefixes (the root config's
    `num_nextn_predict_layers` says 1 on these releases); missing, unexpected or mis-shaped stage
    tensors are refused by name, with FP8 / FP4 weights dequantised. `kernels`: `ModelConfig.kernels`.
    """
    config = read_config(path).replace(kernels=kernels)
    raw = raw_config(path)
    with CheckpointReader(path) as reader:
        kind, stages = detect_mtp(reader.keys(), raw)
        if kind != "dspark":
            raise ValueError(f"{path} holds no DSpark stages (its mtp.* namespace is {kind!r})")
        config = config.replace(mtp_kind=kind, num_mtp_layers=stages)
        draft = V4DSparkDraft.empty(config, stages, dtype=dtype, device=device, confidence_pre_norm=confidence_pre_norm)
        load_weights(draft, reader, fp8_block=fp8_block_of(raw),
                     sources=lambda name, shape: dspark_stage_sources(name, shape, stages))
    draft.sts_temperatures = read_sts(path)
    return draft.attach(target) if target is not None else draft


def save_v4_draft(draft, path: str | Path) -> None:
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


def save_target(model: nn.Module, path: str | Path) -> None:
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
