"""Header-only DeepSeek-V4 releases for the planner tests: V4-Flash's published config, a V4-Pro config
derived from secondary sources, every tensor name / shape / dtype such a release holds, and
safetensors files that carry the header but no data section (all `dspark plan` reads).

Names and shapes come from the model's own meta state dict mapped to upstream names
(`dspark.checkpoint.v4.upstream_sources`); dtypes follow deepseek_v4.md §13.1 and
`tests.helpers.checkpoints.quantise_release`: FP8 e4m3 linear weights with 128×128 ue8m0 `.scale`
siblings, FP4 e2m1 routed experts (two per byte, int8 [N, K/2]) with one ue8m0 scale per 32 inputs,
BF16 norms / embedding / head / router / compressor projections, fp32 mHC / sinks / ape / gate bias,
int32 tid2eid.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import torch

from dspark.checkpoint.v4 import upstream_sources
from dspark.checkpoint.v4_config import config_from_dict
from dspark.model.target import DeepseekV4
from tests.helpers.checkpoints import BF16_PROJECTIONS, FLASH_LEGACY

ELEMENT_BYTES = {"F32": 4, "BF16": 2, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "I32": 4}

# NOTE: V4-Pro's config.json is not in the repository's sources. deepseek_v4.md §2.1 gives H=128, G=16,
# R=1024, D=7168 from HF's docstrings and, from secondary sources, 61 layers + 1 MTP, hd 512, q_lora_rank
# 1536, E=384, K=6, I=3072, index_topk 1024, "layers 0-1 HCA then CSA/HCA interleaved", 3 hash layers,
# 1.6T total. The schedule below is HF's default one (HCA, HCA, then HCA/CSA alternating) plus the
# trailing 0 of the MTP layer; everything unlisted is Flash's. A plausible derivation, not the release.
PRO_DERIVED = {
    **FLASH_LEGACY, "hidden_size": 7168, "num_hidden_layers": 61, "num_attention_heads": 128, "q_lora_rank": 1536,
    "o_groups": 16, "o_lora_rank": 1024, "n_routed_experts": 384, "moe_intermediate_size": 3072,
    "index_topk": 1024,
    "compress_ratios": [128, 128] + [4 if j % 2 else 128 for j in range(59)] + [0],
}


def release_dtype(key: str, shape: tuple[int, ...]) -> str:
    """How the release stores upstream tensor `key` (the weight itself; scales are added beside it)."""
    if re.search(r"\.experts\.\d+\.w[123]\.weight$", key):
        return "FP4"
    if key.endswith(".weight") and len(shape) == 2 and not key.endswith(BF16_PROJECTIONS) and key not in (
            "embed.weight", "head.weight") and not key.endswith("gate.weight"):
        return "FP8"
    if key.endswith(".weight"):
        return "BF16"
    return "I32" if key.endswith("tid2eid") else "F32"


def release_tensors(raw: dict, block: int = 128) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of an upstream release of `raw` (with its MTP module): name → (dtype, shape)."""
    config = config_from_dict(raw)
    with torch.device("meta"):
        model = DeepseekV4(config)
    out = {}
    for name, t in model.state_dict().items():
        for src in upstream_sources(name, t.shape):
            if src.part is None:
                shape = tuple(t.shape)
            else:
                inter = t.shape[1] // 2 if src.part in ("w1", "w3") else t.shape[2]
                shape = (inter, t.shape[2]) if src.part in ("w1", "w3") else (t.shape[1], inter)
            kind = release_dtype(src.key, shape)
            scale = src.key[: -len(".weight")] + ".scale"
            if kind == "FP8":
                out[src.key] = ("F8_E4M3", shape)
                out[scale] = ("F8_E8M0", (math.ceil(shape[0] / block), math.ceil(shape[1] / block)))
            elif kind == "FP4":
                out[src.key] = ("I8", (shape[0], shape[1] // 2))
                out[scale] = ("F8_E8M0", (shape[0], math.ceil(shape[1] / 32)))
            else:
                out[src.key] = (kind, shape)
    return out


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * ELEMENT_BYTES[dtype]


def write_header_only(path: Path, raw: dict, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> Path:
    """config.json + one header-only shard per decoder layer (+ one for the rest) + the index."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw))
    groups: dict[str, list[str]] = {}
    for name in tensors:
        m = re.match(r"(layers|mtp)\.(\d+)\.", name)
        groups.setdefault(m.group(0) if m else "top", []).append(name)
    weight_map = {}
    for i, (group, names) in enumerate(sorted(groups.items())):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            dtype, shape = tensors[name]
            end = offset + nbytes(dtype, shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
            weight_map[name] = file
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        (path / file).write_bytes(struct.pack("<Q", len(text)) + text)  # no data section
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path
