"""Draft-model properties on tiny random configs: config checks, context masking, training vs
inference, the block sampler (dspark.md §2.3) and the checkpoint loader's refusals (dspark.md §9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark import ops
from dspark.ops import _launch
from dspark.ops import markov as markov_ops
from dspark.ops import sampling as sampling_ops
from dspark.config import DraftConfig
from dspark.draft.deepspec import DraftModel
from dspark.checkpoint.deepspec import (draft_config_from_dict, draft_config_to_dict, load_deepspec_draft as load_draft,
                                     load_draft_weights, save_deepspec_draft as save_draft)
from tests.compare import assert_close

HEADS = {
    "vanilla": dict(),
    "gated": dict(markov_head_type="gated"),
    "rnn": dict(markov_head_type="rnn"),
    "dflash": dict(markov_rank=0, has_confidence_head=False, confidence_with_markov=False),
    "conf_no_markov": dict(markov_rank=0, confidence_with_markov=False),
}
MARKOV_HEADS = ("vanilla", "gated", "rnn")
# DeepSpec's Gemma 4 layout (vanilla head, confidence head): values from k_proj, or from their own v_proj.
GEMMA4 = {"gemma4": dict(), "gemma4_v_proj": dict(k_eq_v=False, num_kv_heads=2)}


def make(head: str, seed: int = 0) -> DraftModel:
    cfg = DraftConfig.tiny_gemma4(**GEMMA4[head]) if head in GEMMA4 else DraftConfig.tiny(**HEADS[head])
    return DraftModel.random(cfg, seed=seed)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def context(model: DraftModel, r: int, s: int, seed: int = 1):
    """Random context rows for r requests at positions 0..s−1 → (features, per-layer cache)."""
    feats = torch.randn(r, s, model.config.context_width, generator=gen(seed))
    return feats, model.context_kv(model.project_context(feats), torch.arange(s).expand(r, s))


def block_ids(model: DraftModel, anchors: torch.Tensor) -> torch.Tensor:
    ids = torch.full((anchors.shape[0], model.config.block_size), model.config.mask_token_id)
    ids[:, 0] = anchors
    return ids


def sampling_args(r: int, temperature: float, top_k: int = 0, top_p: float = 1.0):
    return torch.full((r,), temperature), torch.full((r,), top_k), torch.full((r,), top_p)


# ============================================================================ config
@pytest.mark.parametrize("overrides, message", [
    (dict(kind="v5"), "kind"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(num_heads=3), "multiple of num_kv_heads"),
    (dict(head_dim=11), "even"),
    (dict(mask_token_id=67), "mask_token_id"),
    (dict(target_layer_ids=[0, 2]), "tuple"),
    (dict(target_layer_ids=(2, 0)), "strictly increasing"),
    (dict(target_layer_ids=(0, 3)), "last"),
    (dict(target_layer_ids=(-2, 0)), "embedding output"),
    (dict(markov_rank=-1), "markov_rank"),
    (dict(markov_head_type="lstm"), "markov_head_type"),
    (dict(markov_rank=0), "confidence_with_markov"),
    (dict(has_confidence_head=1), "bool"),
    (dict(hidden_act="relu"), "hidden_act"),
    (dict(attention_scale=0.0), "attention_scale"),
    (dict(logit_softcap=-1.0), "logit_softcap"),
    (dict(rope_fraction=0.0), "rope_fraction"),
    (dict(embed_scale=0), "embed_scale"),
    (dict(k_eq_v=1), "bool"),
])
def test_config_refusals(overrides, message):
    with pytest.raises(ValueError, match=message):
        DraftConfig.tiny(**overrides)


def test_state_dict_names_are_deepspecs():
    names = set(make("gated").state_dict())
    assert {"embed_tokens.weight", "fc.weight", "hidden_norm.weight", "norm.weight", "lm_head.weight",
            "layers.1.self_attn.k_norm.weight", "layers.0.mlp.down_proj.weight", "markov_head.markov_w1.weight",
            "markov_head.markov_w2.weight", "markov_head.gate_proj.weight", "markov_head.gate_proj.bias",
            "confidence_head.proj.weight", "confidence_head.proj.bias"} <= names
    assert "markov_head.joint_proj.weight" in make("rnn").state_dict()
    assert not any(n.startswith(("markov_head", "confidence_head")) for n in make("dflash").state_dict())
    cfg = DraftConfig.tiny(confidence_bias=False)
    assert "confidence_head.proj.bias" not in DraftModel(cfg).state_dict()


# ============================================================================ backbone
@pytest.mark.parametrize("head", ["vanilla", "rnn", "gemma4"])
def test_block_hidden_masks_invalid_rows(head):
    """Padded per-request caches with NaN garbage give the compact results; a request with no
    context row attends to its block only."""
    model = make(head)
    lengths = [7, 0, 13]
    s_max = 16
    feats, _ = context(model, 3, s_max)
    anchors = torch.tensor([5, 9, 2])
    pos = torch.tensor(lengths)[:, None] + torch.arange(model.config.block_size)
    valid = torch.arange(s_max) < torch.tensor(lengths)[:, None]
    cache = []
    for k, v in model.context_kv(model.project_context(feats), torch.arange(s_max).expand(3, s_max)):
        garbage = ~valid[:, :, None, None]
        cache.append((k.masked_fill(garbage, torch.nan), v.masked_fill(garbage, torch.nan)))
    h = model.block_hidden(block_ids(model, anchors), pos, cache, valid)
    assert h.isfinite().all()
    for r, n in enumerate(lengths):
        kv = model.context_kv(model.project_context(feats[r:r + 1, :n]), torch.arange(n)[None])
        alone = model.block_hidden(block_ids(model, anchors[r:r + 1]), pos[r:r + 1], kv,
                                   torch.ones(1, n, dtype=torch.bool))
        assert_close(h[r], alone[0], what=f"request {r} with {n} context rows")


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn", "dflash", *GEMMA4])
def test_forward_train_matches_inference(head):
    """Each kept training block equals an inference call with context rows 0..p−1 and teacher-forced
    prev; dummy blocks stay finite."""
    model = make(head)
    cfg = model.config
    b, s = 2, 19
    ids = torch.randint(0, cfg.mask_token_id, (b, s), generator=gen(3))
    feats = torch.randn(b, s, cfg.context_width, generator=gen(4))
    anchors = torch.tensor([[0, 4, 15, 17, 0], [1, 2, 9, 0, 0]])
    keep = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    out = model.forward_train(ids, feats, anchors, keep)
    assert out.draft_logits.isfinite().all()
    assert (out.confidence_logits is None) == (not cfg.has_confidence_head)
    for bi in range(b):
        for k in range(anchors.shape[1]):
            if not keep[bi, k]:
                assert (out.labels[bi, k] == ids[bi, 0]).all()
                continue
            p = int(anchors[bi, k])
            label_pos = [min(p + i + 1, s - 1) for i in range(cfg.block_size)]
            assert out.labels[bi, k].tolist() == ids[bi, label_pos].tolist()
            kv = model.context_kv(model.project_context(feats[bi:bi + 1, :p]), torch.arange(p)[None])
            pos = (p + torch.arange(cfg.block_size))[None]
            h = model.block_hidden(block_ids(model, ids[bi, p:p + 1]), pos, kv, torch.ones(1, p, dtype=torch.bool))
            prev = torch.cat([ids[bi, p:p + 1], out.labels[bi, k, :-1]])[None]
            want = model.corrected_logits_tf(model.base_logits(h), prev, h)
            assert_close(out.draft_logits[bi, k], want[0], what=f"block ({bi}, {k}) at anchor {p}")
            if cfg.has_confidence_head:
                assert_close(out.confidence_logits[bi, k], model.confidence_logits(h, prev)[0], what="confidence")


def test_rnn_state_is_carried_through_the_block():
    model = make("rnn")
    r, g, v = 3, model.config.block_size, model.config.vocab_size
    U = torch.randn(r, g, v, generator=gen(5))
    h = torch.randn(r, g, model.config.hidden_size, generator=gen(6))
    prev = torch.randint(0, v, (r, g), generator=gen(7))
    state, rows, fresh = None, [], []
    for i in range(g):
        row, state = model.markov_logits(U[:, i], prev[:, i], h[:, i], state)
        rows.append(row)
        fresh.append(model.markov_logits(U[:, i], prev[:, i], h[:, i], None)[0])
    assert_close(torch.stack(rows, 1), model.corrected_logits_tf(U, prev, h), what="stepped vs teacher-forced")
    # A per-step helper that resets the state to zero is not the same head (dspark.md §11.9).
    assert not torch.allclose(torch.stack(fresh, 1)[:, 1:], torch.stack(rows, 1)[:, 1:])


# ============================================================================ block sampler
def draft_block(model: DraftModel, r: int, seed: int = 8, scale: float = 1.0):
    cfg = model.config
    U = torch.randn(r, cfg.block_size, cfg.vocab_size, generator=gen(seed)) * scale
    h = torch.randn(r, cfg.block_size, cfg.hidden_size, generator=gen(seed + 1))
    anchor = torch.randint(0, cfg.vocab_size, (r,), generator=gen(seed + 2))
    return U, h, anchor


@pytest.mark.parametrize("head", MARKOV_HEADS)
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8)])
def test_sampled_token_conditions_the_next_slot(head, temperature, top_k, top_p):
    """Ũ and z of the sampled block equal the teacher-forced ones on the SAMPLED prefix, and each
    token is the inverse-CDF draw from probs(Ũ_i) — not an argmax paired with a soft q."""
    model = make(head)
    r, g = 64, model.config.block_size
    U, h, anchor = draft_block(model, r)
    u = torch.rand(r, g, generator=gen(9))
    t, k, p = sampling_args(r, temperature, top_k, top_p)
    tokens, corrected, conf = model.sample_block(U, h, anchor, t, k, p, u)
    prev = torch.cat([anchor[:, None], tokens[:, :-1]], 1)
    assert_close(corrected, model.corrected_logits_tf(U, prev, h), what="corrected logits on the sampled prefix")
    assert_close(conf, model.confidence_logits(h, prev), what="confidence on the sampled prefix")
    for i in range(g):
        assert torch.equal(tokens[:, i], ops.sample(ops.probs(corrected[:, i], t, k, p), u[:, i]))
    assert (tokens != corrected.argmax(-1)).any()  # soft draws really happened


@pytest.mark.skipif(not _launch.HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("head", ["rnn", "dflash"])
def test_kernels_config_runs_the_block_sampler_on_the_kernels(head, monkeypatch):
    """DraftConfig.kernels = "triton": the block sampler launches its kernels (the interpreter on CPU) and
    draws the tokens the references draw (exact integer sampling), with Ũ equal to fp32 tolerance."""
    model = make(head)
    kernel_model = DraftModel.random(DraftConfig.tiny(**HEADS[head], kernels="triton"), seed=0)
    r, g = 5, model.config.block_size
    U, h, anchor = draft_block(model, r)
    u = torch.rand(r, g, generator=gen(11))
    t, k, p = sampling_args(r, 0.8, 3, 0.9)
    with torch.no_grad():
        want = model.sample_block(U, h, anchor, t, k, p, u)
    launched = []
    for module in (markov_ops, sampling_ops):
        real = module.launch
        monkeypatch.setattr(module, "launch", lambda *a, real=real, **kw: launched.append(1) or real(*a, **kw))
    with torch.no_grad():  # the kernels are forward-only
        tokens, corrected, conf = kernel_model.sample_block(U, h, anchor, t, k, p, u)
    assert launched
    assert torch.equal(tokens, want[0])
    assert_close(corrected, want[1], what="corrected logits")
    if conf is not None:
        assert_close(conf, want[2], what="confidence")


@pytest.mark.parametrize("head", ["vanilla", "rnn", "dflash"])
def test_slot0_distribution_is_probs_of_corrected_logits(head):
    """With stratified uniforms the empirical law of slot 0 is probs(Ũ_0) to grid resolution."""
    model = make(head)
    n, g = 4000, model.config.block_size
    U, h, anchor = draft_block(model, 1, scale=2.0)
    U, h, anchor = U.expand(n, -1, -1), h.expand(n, -1, -1), anchor.expand(n)
    u = torch.rand(n, g, generator=gen(10))
    u[:, 0] = (torch.arange(n) + 0.5) / n
    t, k, p = sampling_args(n, 0.9, 0, 0.95)
    tokens, corrected, _ = model.sample_block(U, h, anchor, t, k, p, u)
    q = ops.probs(corrected[:1, 0], t[:1], k[:1], p[:1])[0]
    freq = torch.bincount(tokens[:, 0], minlength=model.config.vocab_size).float() / n
    assert (freq - q).abs().max() <= 1.0 / n + 1e-6
    assert (freq[q == 0] == 0).all()


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn", "dflash"])
def test_greedy_is_argmax_lowest_index(head):
    model = make(head)
    r, g = 6, model.config.block_size
    U, h, anchor = draft_block(model, r)
    if head == "dflash":  # exact ties: the lowest index wins
        U[:, :, 3] = U[:, :, 7] = U.max() + 1
    u = torch.rand(r, g, generator=gen(11))
    temperature = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.5, 0.0])  # greedy and sampled rows share a batch
    tokens, corrected, _ = model.sample_block(U, h, anchor, temperature, torch.zeros(r, dtype=torch.long),
                                              torch.ones(r), u)
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], corrected[greedy].argmax(-1))
    if head == "dflash":
        assert (tokens[greedy] == 3).all()


def test_dflash_slots_are_independent():
    model = make("dflash")
    r, g = 16, model.config.block_size
    U, h, anchor = draft_block(model, r)
    u = torch.rand(r, g, generator=gen(12))
    t, k, p = sampling_args(r, 1.0, 7, 0.9)
    tokens, corrected, conf = model.sample_block(U, h, anchor, t, k, p, u)
    assert conf is None and corrected is U
    for i in range(g):
        assert torch.equal(tokens[:, i], ops.sample(ops.probs(U[:, i], t, k, p), u[:, i]))
    U2 = U.clone()
    U2[:, 0] = torch.randn(r, model.config.vocab_size, generator=gen(13))
    assert torch.equal(model.sample_block(U2, h, anchor, t, k, p, u)[0][:, 1:], tokens[:, 1:])


def test_confidence_without_markov_embedding():
    model = make("conf_no_markov")
    r, g = 4, model.config.block_size
    U, h, anchor = draft_block(model, r)
    _, _, conf = model.sample_block(U, h, anchor, *sampling_args(r, 1.0), torch.rand(r, g, generator=gen(14)))
    assert_close(conf, model.confidence_head.proj(h).squeeze(-1), what="z = proj(h)")


def test_engine_protocol():
    """The names dspark/decode/dspark.py uses: one call = block_hidden → base_logits → sample_block."""
    model = make("gated")
    cfg = model.config
    assert (model.vocab_size, model.block_size, model.block_input_token) == (cfg.vocab_size, cfg.block_size,
                                                                           cfg.mask_token_id)
    assert model.tap_layers == cfg.target_layer_ids and model.context_window is None and model.has_markov_head
    assert model.device == torch.device("cpu")
    r, g, s = 3, cfg.block_size, 9
    feats = torch.randn(s, cfg.context_width, generator=gen(15))
    rows = model.context_rows(model.project_context(feats), torch.arange(s))
    context = [tuple(t.expand(r, *t.shape) for t in layer) for layer in rows]
    valid = torch.arange(s) < torch.tensor([[9], [4], [0]])
    anchor = torch.tensor([3, 5, 8])
    pos = valid.sum(1, keepdim=True) + torch.arange(g)
    args = (anchor, *sampling_args(r, 0.8, 4, 0.9), torch.rand(r, g, generator=gen(16)))
    got = model.draft_block(block_ids(model, anchor), pos, context, valid, *args)
    h = model.block_hidden(block_ids(model, anchor), pos, context, valid)
    want = model.sample_block(model.base_logits(h), h, *args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ============================================================================ loader
def checkpoint(path: Path, model: DraftModel, *, config: dict | None = None, drop=(), extra=None, dtype=None) -> Path:
    """Write `model` in DeepSpec's layout, optionally edited."""
    save_draft(model, path)
    if config is not None or drop or extra is not None or dtype is not None:
        tensors = load_file(path / "model.safetensors")
        tensors = {k: (v.to(dtype) if dtype else v) for k, v in tensors.items() if k not in drop}
        tensors.update(extra or {})
        save_file(tensors, str(path / "model.safetensors"))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("head", [*HEADS, *GEMMA4])
def test_save_load_round_trip(tmp_path, head):
    model = make(head)
    loaded = DraftModel.from_pretrained(checkpoint(tmp_path, model))
    assert loaded.config == model.config
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    assert draft_config_from_dict(draft_config_to_dict(model.config)) == model.config


def test_load_weights_into_an_existing_model(tmp_path):
    path = checkpoint(tmp_path, make("rnn", seed=1))
    model = make("rnn", seed=2)
    load_draft_weights(model, path)
    assert all(torch.equal(t, make("rnn", seed=1).state_dict()[k]) for k, t in model.state_dict().items())
    with pytest.raises(ValueError, match="not the model's"):
        load_draft_weights(make("gated"), path)


def test_round_trip_keeps_our_extra_fields(tmp_path):
    cfg = DraftConfig.tiny(target_hidden_size=32, confidence_bias=False)
    assert DraftModel.from_pretrained(checkpoint(tmp_path, DraftModel.random(cfg))).config == cfg


def test_bf16_checkpoint_upcasts_exactly(tmp_path):
    model = make("gated")
    path = checkpoint(tmp_path, model, dtype=torch.bfloat16)
    loaded = load_draft(path, dtype=torch.float32)
    for name, t in loaded.state_dict().items():
        assert t.dtype == torch.float32
        assert torch.equal(t, model.state_dict()[name].to(torch.bfloat16).float()), name
    assert load_draft(path, dtype=torch.bfloat16).fc.weight.dtype == torch.bfloat16


def test_sharded_checkpoint(tmp_path):
    model = make("rnn")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(draft_config_to_dict(model.config)))
    loaded = load_draft(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tensors.items())


def test_shared_embedding_and_head_fill_absent_tensors(tmp_path):
    model = make("vanilla")
    path = checkpoint(tmp_path, model, drop=("embed_tokens.weight", "lm_head.weight"))
    with pytest.raises(ValueError, match=r"2 missing tensors: embed_tokens.weight, lm_head.weight"):
        load_draft(path)
    loaded = load_draft(path, shared_embed=model.embed_tokens.weight.detach(),
                        shared_head=model.lm_head.weight.detach())
    assert torch.equal(loaded.embed_tokens.weight, model.embed_tokens.weight)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    with pytest.raises(ValueError, match=r"mis-shaped tensors: shared lm_head"):
        load_draft(path, shared_embed=model.embed_tokens.weight, shared_head=torch.zeros(3, 4))


@pytest.mark.parametrize("edit, message", [
    (dict(drop=("markov_head.markov_w2.weight",)), r"1 missing tensors: markov_head.markov_w2.weight"),
    (dict(extra={"markov_head.gate_proj.weight": torch.zeros(6, 46)}), r"unexpected tensors: markov_head.gate_proj"),
    (dict(extra={"model.norm.weight": torch.ones(40)}), r"unexpected tensors: model.norm.weight"),
    (dict(extra={"fc.weight": torch.zeros(40, 72)}), r"mis-shaped tensors: fc.weight \[40, 72\] \(needs \[40, 48\]\)"),
    (dict(extra={"norm.weight": torch.ones(40, dtype=torch.int32)}), r"bad tensors: norm.weight is not floating"),
])
def test_loader_refusals_name_the_tensor(tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        load_draft(checkpoint(tmp_path, make("vanilla"), **edit))


@pytest.mark.parametrize("change, message", [
    (dict(architectures=["Qwen3Eagle3Model"]), "not a DeepSpec DSpark/DFlash draft"),
    (dict(model_type="gemma4_text"), "only Qwen3-style"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), "rope_type 'yarn'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(target_layer_ids=[0, 3]), "may not be tapped"),
    (dict(block_size=None), "lacks"),
])
def test_config_refusals_on_load(tmp_path, change, message):
    model = make("vanilla")
    config = {**draft_config_to_dict(model.config), **change}
    with pytest.raises(ValueError, match=message):
        load_draft(checkpoint(tmp_path, model, config=config))


def test_deepspec_config_spellings():
    """rope_theta at the top level (older transformers) and absent optional DeepSpec fields."""
    d = draft_config_to_dict(DraftConfig.tiny(**HEADS["dflash"]))
    d.pop("rope_parameters")
    d.update(rope_theta=5e5)
    for key in ("markov_rank", "enable_confidence_head", "num_key_value_heads"):
        d.pop(key, None)
    cfg = draft_config_from_dict(d)
    assert cfg.rope_theta == 5e5 and cfg.markov_rank == 0 and not cfg.has_confidence_head
    assert cfg.num_kv_heads == cfg.num_heads


def test_never_unpickles(tmp_path):
    model = make("vanilla")
    (tmp_path / "config.json").write_text(json.dumps(draft_config_to_dict(model.config)))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="never read"):
        load_draft(tmp_path)
