"""`dspark plan` on header-only releases (V4-Flash as published, a derived V4-Pro, the tiny config): weight
bytes equal the headers' sum, the per-rank split sums back to the total, cache bytes equal TargetCache's
own allocation, the smallest GPU counts are consistent and printed, bad flags give one-line errors."""

from __future__ import annotations

import json
import math
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

from dspark.checkpoint.plan import PARTS, cache_bytes, format_plan, parse_size, plan, read_checkpoint, read_headers
from dspark.checkpoint.v4_config import config_from_dict, config_to_dict
from dspark.cli import main
from dspark.config import ModelConfig
from dspark.model.cache import TargetCache
from dspark.model.target import DeepseekV4
from tests.helpers.v4_release import FLASH_LEGACY, PRO_DERIVED, nbytes, release_tensors, write_header_only

EXPERT = re.compile(r"\.experts\.\d+\.")


@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    tensors = release_tensors(FLASH_LEGACY)
    path = write_header_only(tmp_path_factory.mktemp("flash"), FLASH_LEGACY, tensors)
    return path, tensors, read_checkpoint(path)


def tiny_raw() -> dict:
    return config_to_dict(ModelConfig.tiny().replace(mtp_kind="mtp", num_mtp_layers=1))


def test_weight_bytes_are_the_header_sum(flash):
    path, tensors, _ = flash
    spec = {k: nbytes(*v) for k, v in tensors.items()}
    headers = read_headers(path)
    assert {k: h.nbytes for k, h in headers.items()} == spec
    p = plan(path, gpus=8, gpu_mem="141GB", max_batch=8, max_seq_len=65536, search=False)
    assert p.weight_total == sum(v for k, v in spec.items() if not k.startswith("mtp."))
    assert p.draft_total == sum(v for k, v in spec.items() if k.startswith("mtp."))
    assert sum(p.stored_by_dtype.values()) == sum(spec.values())
    assert (p.draft_kind, p.draft_layers) == ("mtp", 1)
    # Released sizes: FP4 experts (int8-packed) + ue8m0 scales dominate; 284B parameters in ~160 GB.
    assert 150e9 < p.weight_total < 165e9 and p.stored_by_dtype["I8"] > 0.85 * p.weight_total
    assert p.loaded_bf16_total > 3.5 * p.weight_total  # today's loader: bf16, everything dequantised


@pytest.mark.parametrize("gpus,tp,ep", [(1, 1, 1), (8, 8, 8), (6, 2, 6), (4, 4, 2)])
def test_per_rank_split_sums_back_to_the_total(flash, gpus, tp, ep):
    _, tensors, checkpoint = flash
    p = plan(checkpoint, gpus=gpus, gpu_mem="141GB", tp=tp, ep=ep, max_seq_len=4096, search=False)
    experts = sum(nbytes(*v) for k, v in tensors.items() if EXPERT.search(k) and not k.startswith("mtp."))
    rest = p.weight_total - p.replicated_bytes - experts  # TP- and vocabulary-split bytes
    # Every TP group of gpus / tp ranks ... holds the TP part once; every EP group of ep ranks the experts once.
    assert sum(w - p.replicated_bytes for w in p.rank_weight_bytes) == (gpus // tp) * rest + (gpus // ep) * experts
    assert len(p.rank_weight_bytes) == gpus and p.dp == gpus // tp
    if gpus == tp == ep == 1:
        assert p.rank_weight_bytes == (p.weight_total,) and p.rank_draft_bytes == (p.draft_total,)


def test_cache_bytes_match_target_cache():
    config = ModelConfig.tiny().replace(mtp_kind="mtp", num_mtp_layers=1)
    for batch, length, prov in [(1, 64, 8), (3, 100, 3), (2, 257, 0)]:
        entry, ring, page, total = cache_bytes(config, max_batch=batch, max_seq_len=length, max_provisional=prov,
                                               dtype=torch.float32, with_mtp=True)
        cache = TargetCache(config, max_batch=batch, max_seq_len=length, max_provisional=prov, with_mtp=True)
        held = sum(t.numel() * t.element_size() for layer in cache.layers + cache.mtp for t in layer.tensors().values())
        assert total == held
        assert page == cache.page_size and entry * page == cache._bytes_per_page()
        assert ring == cache._fixed_bytes(batch + 1, True) // (batch + 1)
    # Flash, bf16: Σ over CSA layers (hd + di) / 4 and HCA layers hd / 128, two bytes each.
    flash_cfg = config_from_dict(FLASH_LEGACY)
    entry, *_ = cache_bytes(flash_cfg, max_batch=1, max_seq_len=4096)
    kinds = flash_cfg.layer_types
    assert entry == 2 * (kinds.count("csa") * (512 + 128) // 4 + kinds.count("hca") * 512 // 128)


def test_tiny_plan_caches_are_the_target_cache(tmp_path):
    raw = tiny_raw()
    path = write_header_only(tmp_path / "tiny", raw, release_tensors(raw))
    p = plan(path, gpus=2, gpu_mem="1GiB", tp=1, ep=2, max_batch=5, max_seq_len=200, kv_dtype="fp32", draft_tokens=4,
             search=False)
    assert p.dp == 2 and p.batch_per_rank == 3
    cache = TargetCache(ModelConfig.tiny().replace(mtp_kind="mtp", num_mtp_layers=1), max_batch=3, max_seq_len=200,
                        max_provisional=4)
    assert p.kv_rank_bytes == sum(t.numel() * t.element_size() for layer in cache.layers + cache.mtp
                                  for t in layer.tensors().values())


def test_smallest_gpu_counts_are_printed_and_consistent(flash):
    _, _, checkpoint = flash
    kw = dict(max_batch=8, max_seq_len=131072)
    p = plan(checkpoint, gpus=2, gpu_mem="141GB", **kw)
    text = format_plan(p)
    assert "smallest GPU count that fits" in text and ("FITS" in text)
    for (label, n), (_, size) in zip(p.smallest_gpus, PARTS):
        assert n is not None and f"{label}: {n}" in text
        assert plan(checkpoint, gpus=n, gpu_mem=size, search=False, **kw).fits
        if n > 1:
            assert not plan(checkpoint, gpus=n - 1, search=False, gpu_mem=size, **kw).fits
    assert dict(p.smallest_gpus)["80 GB"] >= dict(p.smallest_gpus)["141 GB"]


def test_cli_prints_the_plan(flash, capsys):
    path, _, _ = flash
    rc = main(["plan", "--model", str(path), "--gpus", "4", "--gpu-mem", "80GB", "--max-seq-len", "65536",
               "--max-batch", "4"])
    out, err = capsys.readouterr()
    assert rc == 0 and not err
    for needle in ("per rank", "draft (mtp", "today's loader dequantises to bf16", "per token", "workspace",
                   "graphs", "fullest rank", "smallest GPU count"):
        assert needle in out, needle


@pytest.mark.parametrize("args,message", [
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--gpus", "4", "--tp", "3"], "--tp 3 must be >= 1 and divide --gpus 4"),
    (["--gpus", "16", "--tp", "16"], "--tp 16 must divide o_groups 8"),
    (["--gpus", "4", "--ep", "8"], "--ep 8 must be >= 1 and divide --gpus 4"),
    (["--gpus", "4", "--gpu-mem", "lots"], "is not a size"),
    (["--gpus", "4", "--max-seq-len", "2000000"], "--max-seq-len must be in 1..1048576"),
    (["--gpus", "4", "--max-batch", "0"], "--max-batch must be >= 1"),
])
def test_bad_flags_give_one_line_errors(flash, capsys, args, message):
    path, _, _ = flash
    argv = ["plan", "--model", str(path), "--gpu-mem", "141GB", *args]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 1 and not out and err.count("\n") == 1 and message in err, err


def test_missing_model_and_flags(tmp_path, capsys):
    assert main(["plan", "--model", str(tmp_path / "nope"), "--gpus", "1", "--gpu-mem", "80GB"]) == 1
    assert "no checkpoint directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["plan", "--model", str(tmp_path)])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_bad_headers_are_refused(tmp_path):
    raw = tiny_raw()
    path = write_header_only(tmp_path / "t", raw, release_tensors(raw))
    shard = sorted(path.glob("*.safetensors"))[0]
    text = shard.read_bytes()
    (length,) = struct.unpack("<Q", text[:8])
    header = json.loads(text[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 1
    body = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(ValueError, match="data_offsets span"):
        read_headers(path)
    shard.write_bytes(text[:20])
    with pytest.raises(ValueError, match="truncated header"):
        read_headers(path)


def test_parse_size():
    assert parse_size("141GB") == 141 * 10**9 and parse_size("80 GiB") == 80 * 2**30 and parse_size("512") == 512
    for bad in ("", "GB", "-3GB", "0GB", "12 parsecs"):
        with pytest.raises(ValueError):
            parse_size(bad)


@pytest.mark.extended
def test_pro_plans(tmp_path):
    """V4-Pro from a derived config (tests/helpers/v4_release.py): ~1.6T parameters, FP4 experts ≈ 0.82 TB."""
    tensors = release_tensors(PRO_DERIVED)
    path = write_header_only(tmp_path / "pro", PRO_DERIVED, tensors)
    p = plan(path, gpus=8, gpu_mem="141GB", max_batch=8, max_seq_len=131072)
    assert p.weight_total + p.draft_total == sum(nbytes(*v) for v in tensors.values())
    params = sum(math.prod(s) * (2 if d == "I8" else 1) for k, (d, s) in tensors.items()
                 if not k.endswith(".scale") and not k.startswith("mtp."))
    assert 1.5e12 < params < 1.7e12
    assert "smallest GPU count" in format_plan(p)


def test_hf_layout_with_stacked_experts(tmp_path):
    """HF names ([E, 2I, D] stacked experts, lm_head, self_attn.*) split by the same rule."""
    config = ModelConfig.tiny().replace(mtp_kind="none", num_mtp_layers=0)
    state = {k: v.contiguous() for k, v in DeepseekV4.random(config).state_dict().items()}
    (tmp_path / "config.json").write_text(json.dumps(config_to_dict(config)))
    save_file(state, str(tmp_path / "model.safetensors"))
    p = plan(tmp_path, gpus=2, gpu_mem="1GiB", tp=2, ep=2, max_seq_len=64, search=False)
    assert p.weight_total == sum(t.numel() * t.element_size() for t in state.values()) and p.draft_total == 0
    experts = sum(t.numel() * t.element_size() for k, t in state.items() if ".experts." in k)
    split = ("self_attn.q_b_proj.weight", "self_attn.o_a_proj.weight", "self_attn.o_b_proj.weight", "self_attn.sinks",
             "compressor.indexer.q_b_proj.weight", "compressor.indexer.scorer.weights_proj.weight",
             "shared_experts.gate_proj.weight", "shared_experts.up_proj.weight", "shared_experts.down_proj.weight",
             "model.embed_tokens.weight", "lm_head.weight")
    sharded = sum(t.numel() * t.element_size() for k, t in state.items() if k.endswith(split))
    assert p.replicated_bytes == p.weight_total - experts - sharded
    assert sum(w - p.replicated_bytes for w in p.rank_weight_bytes) == p.weight_total - p.replicated_bytes
