"""Memory plan of a DeepSeek-V4 checkpoint on N GPUs, from config.json and the safetensors headers alone
(`dspark plan`): no tensor data is read, so a header-only copy of a release plans like the release.

Weights are counted as stored (numel × element size of each header entry, `.scale` siblings included):
FP8 e4m3 and packed FP4 e2m1 stay at their stored sizes, as issue #18 wants the release resident.
NOTE: today's loader (`load_target`) dequantises to bf16 (fp32 islands kept) on one device with no
sharding; that figure is printed beside, from the model built on the meta device.

Sharding rule of the per-rank split (N ranks, tensor-parallel degree T, expert-parallel degree E,
T and E dividing N; rank r is TP index r mod T and EP index r mod E; attention runs data-parallel
over N / T groups, so each rank holds the caches of ceil(B / (N / T)) requests):

    TP, output rows     attn.wq_b, attn.wo_a (whole o_groups), attn.attn_sink, attn.indexer.wq_b,
                        attn.indexer.weights_proj, shared_experts.w1 / w3 (and HF's names for them)
    TP, input columns   attn.wo_b, shared_experts.w2
    vocabulary (by T)   embed.weight, head.weight (rows)
    EP                  routed experts ffn.experts.{e}.* (contiguous expert ranges per EP index)
    replicated          everything else: wq_a, wkv (the one shared KV head), norms, the compressors
                        (they build the shared KV entries), the router (gate.*, tid2eid), mHC, MTP
                        e_proj / h_proj
    `.scale` siblings follow their weight; a dimension that does not divide gives its first
    shards one row more (`Plan.rank_weight_bytes` lists every rank).

T must divide o_groups, num_heads and index_n_heads. Defaults: T = gcd(N, o_groups, index_n_heads),
E = N. The `mtp.*` tensors (an MTP module or DSpark stages) are the draft, split by the same rule.

Caches come from `dspark.model.cache.TargetCache` (built on the meta device): per-request rings
(sliding window, compressor and indexer raw rings, the MTP window) and paged compressed-entry / indexer
key pools, in `kv_dtype`. Estimates (say so wherever printed):
    workspace  the activations of the largest forward, a prefill chunk or a verify step, per token:
               mHC streams (3 live copies, bf16), q heads and o_a groups of this rank (bf16), routed
               expert rows K · 2I (fp32), the indexer's fp32 score row over every compressed entry,
               plus fp32 logits of the verify rows over this rank's vocabulary; ×2 for the allocator.
    graphs     CUDA graphs share one pool: the verify-step workspace again + 32 MiB per captured bucket.
    reserve    CUDA context, cuBLAS / NCCL buffers: a flat 2 GiB per rank.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dspark.checkpoint.reader import raw_config
from dspark.checkpoint.v4 import detect_mtp
from dspark.checkpoint.v4_config import read_config
from dspark.config import ModelConfig
from dspark.model.cache import TargetCache
from dspark.model.decoder import cast_keeping_fp32_islands
from dspark.model.target import DeepseekV4

ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I64": 8,
                 "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
GB, GIB, MIB = 10**9, 2**30, 2**20
PARTS = (("80 GB", 80 * GB), ("141 GB", 141 * GB))  # H100 / H200-class parts
MAX_GPUS = 512  # the search for the smallest GPU count stops here
_MAX_HEADER = 100 * MIB  # safetensors' own limit

RESERVE_BYTES = 2 * GIB
GRAPH_BYTES_PER_BUCKET = 32 * MIB
GRAPH_BUCKETS = 8
KV_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# Upstream (DeepSeek) and HF spellings of the sharded tensors; matched against a name's suffix.
_TP_ROWS = re.compile(r"\.(attn\.wq_b|attn\.wo_a|attn\.attn_sink|attn\.indexer\.wq_b|attn\.indexer\.weights_proj|"
                      r"shared_experts\.w[13]|self_attn\.q_b_proj|self_attn\.o_a_proj|self_attn\.sinks|"
                      r"compressor\.indexer\.q_b_proj|compressor\.indexer\.scorer\.weights_proj|"
                      r"shared_experts\.gate_proj|shared_experts\.up_proj)(\.weight|\.scale)?$")
_TP_COLS = re.compile(r"\.(attn\.wo_b|shared_experts\.w2|self_attn\.o_b_proj|shared_experts\.down_proj)"
                      r"(\.weight|\.scale)$")
_VOCAB = re.compile(r"^(embed\.weight|head\.weight|model\.embed_tokens\.weight|lm_head\.weight)$")
_EXPERT = re.compile(r"\.experts\.(\d+)\.w[123]\.(weight|scale)$")
_STACKED_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


@dataclass(frozen=True)
class TensorHeader:
    """One safetensors header entry."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int  # as stored: numel × element size


def _read_header(file: Path) -> dict[str, TensorHeader]:
    """The tensors a safetensors file declares: its 8-byte length + JSON header (the data may be absent)."""
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_HEADER:
                raise ValueError(f"header length {length} exceeds {_MAX_HEADER}")
            text = f.read(length)
        if len(text) < length:
            raise ValueError("truncated header")
        header = json.loads(text)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if dtype not in ELEMENT_BYTES:
                raise ValueError(f"{name!r} has unsupported dtype {dtype}")
            size = math.prod(shape) * ELEMENT_BYTES[dtype]
            if end - begin != size:
                raise ValueError(f"{name!r}: data_offsets span {end - begin} B, {dtype} {list(shape)} needs {size}")
            out[name] = TensorHeader(dtype, shape, size)
        return out
    except OSError:
        raise
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not a readable safetensors header ({e})") from None


def read_headers(path: str | Path) -> dict[str, TensorHeader]:
    """Every tensor header of a checkpoint directory (single file or sharded behind an index)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no checkpoint directory")
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if not index.is_file():
        if not single.is_file():
            raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")
        return _read_header(single)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not a dict")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a weight_map ({e!r})") from None
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        shards.setdefault(shard, []).append(name)
    out = {}
    for shard, names in shards.items():
        if not isinstance(shard, str) or not shard or "/" in shard or "\\" in shard or shard in (".", ".."):
            raise ValueError(f"{index}: shard {shard!r} is not a file name inside the checkpoint directory")
        file = path / shard
        if not file.is_file():
            raise ValueError(f"{index}: shard {shard} is missing (needed for {names[0]!r})")
        held = _read_header(file)
        absent = [n for n in names if n not in held]
        if absent:
            raise ValueError(f"{file}: the index maps {absent[0]!r} (+{len(absent) - 1} more) to it, which it does "
                             "not hold")
        out.update({n: held[n] for n in names})
    return out


# ------------------------------------------------------------------------------------------ sharding
def _chunk(size: int, parts: int, index: int) -> int:
    """Rows of shard `index` when `size` rows split into `parts` (the first ones one row more)."""
    return size // parts + (1 if index < size % parts else 0)


@dataclass
class Footprint:
    """Bytes of a set of tensors by sharding class, compact enough to evaluate any (T, E, rank)."""

    replicated: int = 0
    tp: dict[int, int] = field(default_factory=dict)  # split dim size → bytes per row of that dim
    vocab: dict[int, int] = field(default_factory=dict)  # likewise, split by T
    experts: dict[int, int] = field(default_factory=dict)  # expert index → bytes
    num_experts: int = 0

    @property
    def total(self) -> int:
        rows = sum(size * per for d in (self.tp, self.vocab) for size, per in d.items())
        return self.replicated + rows + sum(self.experts.values())

    def add(self, name: str, t: TensorHeader, num_experts: int) -> None:
        if (m := _EXPERT.search(name)) is not None:
            e = int(m.group(1))
            self.experts[e] = self.experts.get(e, 0) + t.nbytes
            self.num_experts = max(self.num_experts, num_experts, e + 1)
        elif _STACKED_EXPERTS.search(name) and len(t.shape) == 3:  # HF layout: [E, ., .]
            per = t.nbytes // t.shape[0]
            for e in range(t.shape[0]):
                self.experts[e] = self.experts.get(e, 0) + per
            self.num_experts = max(self.num_experts, num_experts, t.shape[0])
        elif _VOCAB.match(name) and t.shape:
            self._rows(self.vocab, t, 0)
        elif _TP_ROWS.search(name) and t.shape:
            self._rows(self.tp, t, 0)
        elif _TP_COLS.search(name) and len(t.shape) == 2:
            self._rows(self.tp, t, 1)
        else:
            self.replicated += t.nbytes

    @staticmethod
    def _rows(table: dict[int, int], t: TensorHeader, dim: int) -> None:
        size = t.shape[dim]
        if size:
            table[size] = table.get(size, 0) + t.nbytes // size

    def rank_bytes(self, tp: int, ep: int, rank: int) -> int:
        t, e = rank % tp, rank % ep
        rows = sum(_chunk(size, tp, t) * per for d in (self.tp, self.vocab) for size, per in d.items())
        first = sum(_chunk(self.num_experts, ep, i) for i in range(e))
        mine = range(first, first + _chunk(self.num_experts, ep, e))
        return self.replicated + rows + sum(self.experts.get(i, 0) for i in mine)


# ------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Plan:
    """What `dspark plan` prints (bytes are per rank unless named total)."""

    model: str
    num_layers: int
    gpus: int
    tp: int
    ep: int
    dp: int  # attention data-parallel groups = gpus / tp
    gpu_mem: int
    max_batch: int
    max_seq_len: int
    batch_per_rank: int  # requests whose caches one rank holds: ceil(max_batch / dp)
    kv_dtype: str
    stored_by_dtype: dict[str, int]  # total stored bytes per header dtype (target and draft)
    weight_total: int  # target (non-mtp.*) tensors, as stored
    draft_total: int  # mtp.* tensors, as stored
    draft_kind: str  # 'none', 'mtp' or 'dspark'
    draft_layers: int
    loaded_bf16_total: int  # what today's loader allocates for the target (bf16, fp32 islands), one device
    rank_weight_bytes: tuple[int, ...]  # per rank, target
    rank_draft_bytes: tuple[int, ...]  # per rank, draft
    replicated_bytes: int  # per rank, target: the replicated part (same on every rank)
    entry_bytes_per_token: int  # compressed entries + indexer keys, every layer, per cached token
    ring_bytes_per_request: int  # window / raw / MTP rings of one request (independent of length)
    page_size: int
    kv_rank_bytes: int  # every cache tensor of one rank at batch_per_rank × max_seq_len
    workspace_bytes: int
    graph_bytes: int
    reserve_bytes: int
    smallest_gpus: tuple[tuple[str, int | None], ...]  # (part, smallest count that fits or None)

    @property
    def weight_rank_max(self) -> int:
        return max(self.rank_weight_bytes)

    @property
    def rank_total(self) -> int:
        """The fullest rank: weights + draft + caches + estimates."""
        return max(w + d for w, d in zip(self.rank_weight_bytes, self.rank_draft_bytes)) + self.kv_rank_bytes + \
            self.workspace_bytes + self.graph_bytes + self.reserve_bytes

    @property
    def fits(self) -> bool:
        return self.rank_total <= self.gpu_mem


def parse_size(text: str) -> int:
    """'141GB' / '80 GiB' / '512MB' / a plain byte count → bytes (GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if m is None:
        raise ValueError(f"--gpu-mem {text!r} is not a size such as 141GB or 80GiB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
             "GIB": 2**30, "TIB": 2**40}[unit]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise ValueError(f"--gpu-mem {text!r} must be positive")
    return value


def default_tp(gpus: int, config: ModelConfig) -> int:
    return math.gcd(gpus, config.o_groups, config.num_heads, config.index_n_heads)


def _check_layout(gpus: int, tp: int, ep: int, config: ModelConfig) -> None:
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    for name, v in (("--tp", tp), ("--ep", ep)):
        if v < 1 or gpus % v:
            raise ValueError(f"{name} {v} must be >= 1 and divide --gpus {gpus}")
    for what, n in (("o_groups", config.o_groups), ("num_attention_heads", config.num_heads),
                    ("index_n_heads", config.index_n_heads)):
        if n % tp:
            raise ValueError(f"--tp {tp} must divide {what} {n} (attention heads are split by TP)")


@dataclass(frozen=True)
class Checkpoint:
    """Everything of a checkpoint the plan needs, read once (`read_checkpoint`)."""

    name: str
    config: ModelConfig
    headers: dict[str, TensorHeader]
    target: Footprint
    draft: Footprint
    draft_kind: str
    draft_layers: int
    loaded_bf16: int


def read_checkpoint(path: str | Path, config: ModelConfig | None = None) -> Checkpoint:
    """Headers, config and footprints of checkpoint `path` (`config`: its already-read ModelConfig)."""
    raw = raw_config(path)
    config = read_config(path) if config is None else config
    headers = read_headers(path)
    kind, layers = detect_mtp(headers, raw)
    target, draft = Footprint(), Footprint()
    for name, t in headers.items():
        (draft if name.startswith("mtp.") else target).add(name, t, config.n_routed_experts)
    # Today's loader: the model in bf16 with fp32 islands (an MTP module is built and loaded).
    built = config.replace(mtp_kind=kind if kind == "mtp" else "none", num_mtp_layers=layers if kind == "mtp" else 0)
    with torch.device("meta"):
        meta = cast_keeping_fp32_islands(DeepseekV4(built), torch.bfloat16)
    loaded = sum(t.numel() * t.element_size() for t in meta.state_dict().values())
    return Checkpoint(Path(path).name, config, headers, target, draft, kind, layers, loaded)


def cache_bytes(config: ModelConfig, *, max_batch: int, max_seq_len: int, max_provisional: int = 8,
                dtype: torch.dtype = torch.bfloat16, with_mtp: bool = False) -> tuple[int, int, int, int]:
    """(entry bytes per token, ring bytes per request, page size, all cache bytes at max_batch × max_seq_len),
    from a `TargetCache` built on the meta device (one slot), scaled as TargetCache sizes itself:
    (max_batch + 1 dummy) slots of rings and max_batch · pages_per_slot + 1 trash page."""
    cache = TargetCache(config, max_batch=1, max_seq_len=max_seq_len, max_provisional=max_provisional, dtype=dtype,
                        device="meta", with_mtp=with_mtp)
    ring = pool = 0
    for layer in cache.layers + cache.mtp:
        for name, t in layer.tensors().items():
            size = t.numel() * t.element_size()
            if name in ("entries", "index_keys"):
                pool += size
            else:
                ring += size
    slots, pages = 2, cache.num_pages  # one slot + the dummy; pages_per_slot + the trash page
    ring_per_request, page_bytes = ring // slots, pool // pages
    entry_per_token = page_bytes // cache.page_size
    total = (max_batch + 1) * ring_per_request + (max_batch * cache.pages_per_slot + 1) * page_bytes
    return entry_per_token, ring_per_request, cache.page_size, total


def _workspace(config: ModelConfig, *, tp: int, tokens: int, verify_rows: int, max_seq_len: int) -> int:
    c = config
    routed = c.num_experts_per_tok * 2 * c.moe_intermediate_size * 4
    per_token = (3 * c.hc_mult * c.hidden_size * 2 + (c.num_heads // tp) * c.head_dim * 2
                 + (c.o_groups // tp) * c.o_lora_rank * 2 + routed + math.ceil(max_seq_len / c.csa_rate) * 4)
    logits = verify_rows * math.ceil(c.vocab_size / tp) * 4
    return 2 * (tokens * per_token + logits)


def plan(path: str | Path | Checkpoint, *, gpus: int, gpu_mem: int | str, max_batch: int = 1,
         max_seq_len: int | None = None, tp: int | None = None, ep: int | None = None, kv_dtype: str = "bf16",
         draft_tokens: int = 8, prefill_chunk: int = 4096, search: bool = True) -> Plan:
    """The memory plan of checkpoint `path` (a directory, or one already read) on `gpus` GPUs of `gpu_mem`
    bytes each (see the module docstring). Every flag is checked before the headers are read.
    `search`: also find the smallest GPU counts that fit on 80 GB and 141 GB parts."""
    gpu_mem = parse_size(gpu_mem) if isinstance(gpu_mem, str) else int(gpu_mem)
    if gpu_mem <= 0:
        raise ValueError(f"--gpu-mem must be positive, got {gpu_mem}")
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {max_batch}")
    if draft_tokens < 0:
        raise ValueError(f"--draft-tokens must be >= 0, got {draft_tokens}")
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv dtype must be one of {sorted(KV_DTYPES)}, got {kv_dtype!r}")
    c = path.config if isinstance(path, Checkpoint) else read_config(path)
    max_seq_len = c.max_position_embeddings if max_seq_len is None else max_seq_len
    if not 1 <= max_seq_len <= c.max_position_embeddings:
        raise ValueError(f"--max-seq-len must be in 1..{c.max_position_embeddings} (the model's "
                         f"max_position_embeddings), got {max_seq_len}")
    tp = default_tp(gpus, c) if tp is None else tp
    ep = gpus if ep is None else ep
    _check_layout(gpus, tp, ep, c)
    m = path if isinstance(path, Checkpoint) else read_checkpoint(path, c)
    dp = gpus // tp
    per_rank_batch = math.ceil(max_batch / dp)
    entry, ring, page, kv = cache_bytes(c, max_batch=per_rank_batch, max_seq_len=max_seq_len,
                                        max_provisional=draft_tokens, dtype=KV_DTYPES[kv_dtype],
                                        with_mtp=m.draft_kind == "mtp")
    verify = per_rank_batch * (1 + draft_tokens)
    decode_ws = _workspace(c, tp=tp, tokens=verify, verify_rows=verify, max_seq_len=max_seq_len)
    workspace = max(decode_ws, _workspace(c, tp=tp, tokens=min(prefill_chunk, max_seq_len), verify_rows=1,
                                          max_seq_len=max_seq_len))
    graphs = decode_ws + GRAPH_BUCKETS * GRAPH_BYTES_PER_BUCKET
    by_dtype: dict[str, int] = {}
    for t in m.headers.values():
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
    smallest = ()
    if search:
        smallest = tuple((label, smallest_gpus(m, size, max_batch=max_batch, max_seq_len=max_seq_len,
                                               kv_dtype=kv_dtype, draft_tokens=draft_tokens,
                                               prefill_chunk=prefill_chunk)) for label, size in PARTS)
    return Plan(
        model=m.name, num_layers=c.num_layers, gpus=gpus, tp=tp, ep=ep, dp=dp, gpu_mem=gpu_mem, max_batch=max_batch,
        max_seq_len=max_seq_len, batch_per_rank=per_rank_batch, kv_dtype=kv_dtype,
        stored_by_dtype=dict(sorted(by_dtype.items(), key=lambda kv: -kv[1])), weight_total=m.target.total,
        draft_total=m.draft.total, draft_kind=m.draft_kind, draft_layers=m.draft_layers,
        loaded_bf16_total=m.loaded_bf16,
        rank_weight_bytes=tuple(m.target.rank_bytes(tp, ep, r) for r in range(gpus)),
        rank_draft_bytes=tuple(m.draft.rank_bytes(tp, ep, r) for r in range(gpus)),
        replicated_bytes=m.target.replicated, entry_bytes_per_token=entry, ring_bytes_per_request=ring,
        page_size=page, kv_rank_bytes=kv, workspace_bytes=workspace, graph_bytes=graphs, reserve_bytes=RESERVE_BYTES,
        smallest_gpus=smallest)


def smallest_gpus(checkpoint: Checkpoint, gpu_mem: int, **kw) -> int | None:
    """The fewest GPUs (default T and E for each count, up to MAX_GPUS) on which the plan fits, or None."""
    for n in range(1, MAX_GPUS + 1):
        if plan(checkpoint, gpus=n, gpu_mem=gpu_mem, search=False, **kw).fits:
            return n
    return None


# ------------------------------------------------------------------------------------------ text
def _gb(n: int) -> str:
    return f"{n / GB:,.2f} GB"


def _size(n: int) -> str:
    if n >= GB:
        return _gb(n)
    if n >= 10**6:
        return f"{n / 10**6:,.1f} MB"
    if n >= 10**3:
        return f"{n / 10**3:,.1f} kB"
    return f"{n} B"


def format_plan(p: Plan) -> str:
    """The text `dspark plan` prints."""
    fullest = max(range(p.gpus), key=lambda r: p.rank_weight_bytes[r] + p.rank_draft_bytes[r])
    w, d = p.rank_weight_bytes, p.rank_draft_bytes
    lines = [
        f"{p.model}: {p.num_layers} layers on {p.gpus} GPU(s) of {_gb(p.gpu_mem)}: TP {p.tp} (attention heads, "
        f"shared expert, vocabulary), EP {p.ep} (routed experts), {p.dp} attention data-parallel group(s)",
        "",
        "weights, as stored in the checkpoint (FP8 / FP4 resident at their stored sizes):",
        f"  target total        {_gb(p.weight_total)}",
        "  by header dtype     " + ", ".join(f"{k} {_gb(v)}" for k, v in p.stored_by_dtype.items())
        + " (target + draft; I8 = packed FP4, F8_E8M0 = scales)",
        f"  per rank            {_gb(min(w))} .. {_gb(max(w))}   (replicated part {_gb(p.replicated_bytes)})",
        f"  draft ({p.draft_kind}, {p.draft_layers} block(s) under mtp.*)   total {_gb(p.draft_total)}, "
        f"per rank {_gb(max(d))}",
        f"  NOTE: today's loader dequantises to bf16 (fp32 islands kept) on one device, unsharded: "
        f"{_gb(p.loaded_bf16_total)} for the target" + (" and its MTP module" if p.draft_kind == "mtp" else ""),
        "",
        f"caches ({p.kv_dtype}, {p.batch_per_rank} request(s) per rank of max batch {p.max_batch}, "
        f"{p.max_seq_len:,} positions, pages of {p.page_size} tokens):",
        f"  compressed entries + indexer keys   {_size(p.entry_bytes_per_token)} per token "
        f"({_gb(p.entry_bytes_per_token * p.max_seq_len)} per full-length request)",
        f"  window / raw / MTP rings            {_size(p.ring_bytes_per_request)} per request, any length",
        f"  per rank at batch x length          {_gb(p.kv_rank_bytes)}",
        "",
        "estimates (see dspark/checkpoint/plan.py):",
        f"  workspace   {_gb(p.workspace_bytes)}   largest forward's activations (prefill chunk or verify step) "
        "incl. the indexer's fp32 score row and fp32 logits, x2 for the allocator",
        f"  graphs      {_gb(p.graph_bytes)}   one shared CUDA-graph pool (the verify step's workspace) + "
        f"{GRAPH_BUCKETS} buckets x {GRAPH_BYTES_PER_BUCKET // MIB} MiB",
        f"  reserve     {_gb(p.reserve_bytes)}   CUDA context, cuBLAS / NCCL buffers (flat)",
        "",
        f"fullest rank (rank {fullest}): {_gb(p.rank_total)} of {_gb(p.gpu_mem)}: "
        + ("FITS" if p.fits else "DOES NOT FIT")
        + f" (headroom {_gb(p.gpu_mem - p.rank_total)})",
    ]
    if p.smallest_gpus:
        shown = [f"{label}: {n if n is not None else f'more than {MAX_GPUS}'}" for label, n in p.smallest_gpus]
        lines.append("smallest GPU count that fits (default TP / EP, same batch and length): " + ", ".join(shown))
    return "\n".join(lines)
