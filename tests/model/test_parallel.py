"""Tensor and expert parallelism over gloo ranks on this machine: a sharded tiny V4 gives the single
process's logits (dense and cached ragged, fp32, ≤ 1e-5), and generation on every rank emits the single
process's tokens, with every rank agreeing on each round's emitted tokens and verify lengths."""

from __future__ import annotations

import functools

import pytest
import torch

from dspark.checkpoint import v4
from dspark.checkpoint.v4 import load_target, to_upstream
from dspark.checkpoint.v4_config import config_to_dict
from dspark.config import EngineConfig, SamplingParams
from dspark.decode import Engine, run
from dspark.model import parallel as parallel_module
from dspark.model.batch import Batch
from dspark.model.parallel import Parallel, copy_shard_, module_shapes, shard_dims
from dspark.model.target import DeepseekV4
from tests.helpers.checkpoints import FLASH_LEGACY, assert_states_equal, quantise_release, write
from tests.helpers.drafters import TOY_SPS, tiny_dspark_draft
from tests.helpers.parallel import parallel_config, run_ranks

ATOL = 1e-5  # fp32: the partial sums add in another order than one process's GEMMs


@functools.lru_cache(maxsize=None)
def full_model(peaked: bool = False) -> DeepseekV4:
    """The single-process model; `peaked` favours a few tokens (logits up to ~30, not ~4), so the MTP and
    the drafts get real acceptances in generation."""
    model = DeepseekV4.random(parallel_config(), seed=0).eval()
    if peaked:
        with torch.no_grad():
            model.lm_head.weight[2:5] *= 8
    return model


def local_model(parallel: Parallel, peaked: bool = False) -> DeepseekV4:
    full = full_model(peaked)
    return copy_shard_(DeepseekV4.empty(full.config, parallel=parallel), full, parallel).eval()


def test_single_is_the_identity_and_sizes_that_do_not_divide_are_refused():
    single = Parallel.single()
    x = torch.randn(3, 5)
    assert single.sum(x) is x and single.concat(x) is x
    with pytest.raises(ValueError, match="o_groups 2 is not divisible by the parallel world size 4"):
        Parallel(rank=0, world=4).check(parallel_config(o_groups=2))
    with pytest.raises(ValueError, match="vocab_size 509 is not divisible"):
        DeepseekV4(parallel_config(vocab_size=509), Parallel(rank=1, world=2))


def _sum_worker(parallel: Parallel, sizes: list[tuple[int, ...]]):
    parts = [[torch.randn(size, generator=torch.Generator().manual_seed(100 * r + i)) for r in range(parallel.world)]
             for i, size in enumerate(sizes)]
    return [(parallel.sum(p[parallel.rank]), p) for p in parts]


def test_the_rank_sum_adds_in_rank_order_identically_on_every_rank():
    # [3, 5] is gathered; the large one reduce-scatters, padded (its size is odd)
    sizes = [(3, 5), (7, parallel_module.SCATTER_MIN_ELEMENTS // 7 + 1)]
    ranks = run_ranks(_sum_worker, 2, sizes)
    for i, (total, parts) in enumerate(ranks[0]):
        assert total.shape == sizes[i] and torch.equal(total, parts[0] + parts[1])
        assert torch.equal(ranks[1][i][0], total)


@pytest.mark.parametrize("world", [2, 4])
def test_a_rank_holds_its_share_of_the_sharded_weights(world):
    full = full_model()
    with torch.device("meta"):
        local = DeepseekV4(full.config, Parallel(rank=world - 1, world=world))
    dims = shard_dims(module_shapes(full), module_shapes(local), world)
    numel = {k: v.numel() for k, v in full.state_dict().items()}
    sharded = sum(n for k, n in numel.items() if dims[k] is not None)
    mine = sum(p.numel() for p in local.state_dict(keep_vars=True).values())
    assert mine == sum(numel.values()) - sharded + sharded // world
    # what is sharded: heads, o-groups, experts, shared-expert width (decoder layers and the MTP block), vocabulary
    block = {"self_attn.q_b_proj.weight", "self_attn.sinks", "self_attn.o_a_proj.weight", "self_attn.o_b_proj.weight",
             "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.shared_experts.gate_proj.weight",
             "mlp.shared_experts.up_proj.weight", "mlp.shared_experts.down_proj.weight"}
    expected = {f"model.layers.{i}.{n}" for i in range(full.config.num_layers) for n in block}
    assert {k for k, d in dims.items() if d is not None} == expected | {f"mtp.0.{n}" for n in block} | {"lm_head.weight"}


# ---------------------------------------------------------------- sharded loading

@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """The model as an FP8 / FP4 release in three files (upstream names, as V4-Flash ships)."""
    config = full_model().config
    stored, _ = quantise_release(to_upstream(full_model().state_dict()))
    return write(tmp_path_factory.mktemp("release"), stored,
                 dict(config_to_dict(config), quantization_config=FLASH_LEGACY["quantization_config"]), shards=3)


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_loads_only_its_shard_of_a_release(release, world, monkeypatch):
    single = load_target(release)
    read = []
    original = v4.read_tensor
    monkeypatch.setattr(v4, "read_tensor", lambda reader, key, block: read.append(key) or original(reader, key, block))
    experts_per_rank = single.config.n_routed_experts // world
    for rank in range(world):
        read.clear()
        parallel = Parallel(rank=rank, world=world)  # loading needs no process group
        local = load_target(release, parallel=parallel)
        assert local.parallel == parallel
        assert_states_equal(local.state_dict(), copy_shard_(DeepseekV4.empty(single.config, parallel=parallel),
                                                            single, parallel).state_dict())
        experts = {int(k.split(".")[4]) for k in read if ".ffn.experts." in k}
        assert experts == set(range(rank * experts_per_rank, (rank + 1) * experts_per_rank))


# ---------------------------------------------------------------- logits

PROMPTS = ([5, 9, 300, 41, 7, 2, 2, 3, 88, 120, 17, 4, 4, 61, 33, 2, 9, 500, 3, 3, 71], [12, 3, 4, 400, 8, 16, 2])


def logits_on(model: DeepseekV4, dense_ids: torch.Tensor):
    """Dense logits of dense_ids [B, S]; then the cached ragged path over two requests in slots 1 and 0: a
    prefill of each prompt's head, and a verify of its tail with a wrong token in it (logits for every row)."""
    with torch.no_grad():
        dense = model(dense_ids)
        cache = model.new_cache(max_batch=2, max_seq_len=32, max_provisional=8)
        for slot, p in zip((1, 0), PROMPTS):
            cache.admit(slot, len(p) + 2)
        heads = [(1, 0, PROMPTS[0][:16]), (0, 0, PROMPTS[1][:4])]
        prefill = model.forward_batch(Batch.build(heads, dummy_slot=cache.dummy_slot, pad_to=22), cache).logits
        tails = [(1, 16, PROMPTS[0][16:] + [6]), (0, 4, PROMPTS[1][4:6] + [250])]
        verify = model.forward_batch(Batch.build(tails, dummy_slot=cache.dummy_slot, logits="all"), cache).logits
    return dense, prefill, verify


def _logits_worker(parallel: Parallel, dense_ids: torch.Tensor):
    return logits_on(local_model(parallel), dense_ids)


def check_logits(world: int) -> None:
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(1))
    expected = logits_on(full_model(), ids)
    ranks = run_ranks(_logits_worker, world, ids)
    for rank, got in enumerate(ranks):
        for what, g, e in zip(("dense", "prefill", "verify"), got, expected):
            assert g.shape == e.shape, (what, rank)
            err = (g - e).abs().max().item()
            assert err <= ATOL, f"rank {rank} {what}: max |Δ| {err:.2e} against the single process"
            assert torch.equal(g, ranks[0][("dense", "prefill", "verify").index(what)]), f"rank {rank} {what}"


def test_world_2_logits_equal_the_single_process():
    check_logits(2)


@pytest.mark.extended
def test_world_4_logits_equal_the_single_process():
    check_logits(4)


# ---------------------------------------------------------------- generation

GEN_PROMPTS = ([5, 9, 300, 41, 7, 2, 2, 3, 88, 120, 17, 4, 4, 61, 33, 2, 9], [12, 3, 4], [400, 8, 16, 2, 77, 91, 3])


def generation_on(model: DeepseekV4, method: str, sampled: bool, prompts: list[list[int]], max_batch: int,
                  scheduler: str = "fixed") -> dict:
    """Each request's tokens, each step's new tokens per request, and per round its verify length ℓ,
    accepted count and emitted count. The adaptive schedulers get one SPS table on every rank (a profile
    would differ per rank)."""
    draft = tiny_dspark_draft(model.config.vocab_size) if method == "dspark" else None
    adaptive = dict(sps=TOY_SPS, adapt=True) if scheduler != "fixed" else {}
    engine = Engine(model, method, draft, EngineConfig(num_draft_tokens=None if method == "ar" else 3,
                                                       max_batch=max_batch, max_seq_len=64, scheduler=scheduler,
                                                       **adaptive))
    params = [SamplingParams(temperature=1.0 if sampled else 0.0, seed=11 + i if sampled else None, max_tokens=12)
              for i in range(len(prompts))]
    steps, stats = [], {}
    requests = run(engine, prompts, params)
    for outputs in requests:
        steps.append({o.request_id: o.new_token_ids for o in outputs})
        stats.update({o.request_id: (o.stats.proposal_lens, o.stats.accepted, o.stats.emitted) for o in outputs})
    tokens = [[t for step in steps for t in step.get(rid, [])] for rid in requests.request_ids]
    return dict(tokens=tokens, steps=steps, rounds=[stats[rid] for rid in requests.request_ids])


def _generation_worker(parallel: Parallel, cases: list) -> list[dict]:
    model = local_model(parallel, peaked=True)
    with torch.no_grad():
        return [generation_on(model, *case) for case in cases]


# (method, sampled, prompts, max_batch[, scheduler]): all three prompts in one batch, and two slots so one
# request waits; the hardware scheduler's lengths depend on every request's confidences.
CASES = [(m, sampled, list(GEN_PROMPTS), b) for m in ("ar", "mtp", "dspark") for sampled in (False, True)
         for b in (3, 2)] + [("dspark", True, list(GEN_PROMPTS), 3, "hardware")]


def check_generation(world: int, cases: list) -> None:
    with torch.no_grad():
        expected = [generation_on(full_model(peaked=True), *case) for case in cases]
    ranks = run_ranks(_generation_worker, world, cases, timeout=300)
    for c, case in enumerate(cases):
        for rank in range(world):  # every rank agrees on every round: emitted tokens and verify lengths
            assert ranks[rank][c] == ranks[0][c], f"rank {rank} diverged from rank 0 in {case}"
        assert ranks[0][c]["tokens"] == expected[c]["tokens"], case
        assert ranks[0][c]["rounds"] == expected[c]["rounds"], case
    assert any(sum(a) for e in expected for _, a, _ in e["rounds"]), "no draft was ever accepted: a weak test"


def test_world_2_greedy_generation_equals_the_single_process():
    check_generation(2, [c for c in CASES if c[0] in ("ar", "mtp") and not c[1] and c[3] == 2])


@pytest.mark.extended
@pytest.mark.parametrize("world", [2, 4])
def test_generation_equals_the_single_process_on_every_rank(world):
    check_generation(world, CASES)
