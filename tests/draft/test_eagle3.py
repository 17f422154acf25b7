"""The EAGLE-3 draft against DeepSpec's own outputs (tests/data/eagle3_golden, tools/make_eagle3_golden.py).

DeepSpec's `Qwen3Eagle3Evaluator` (and `Gemma4Eagle3Evaluator`: the gemma4 case) ran a greedy generation
with a tiny random EAGLE-3 draft (saved in bf16 by DeepSpec's checkpoint code, run in fp32) over the
golden tiny Qwen3 target (a tiny Gemma 4 target). The fixture holds
every draft-cache extension (target features, the paired next tokens, positions, and the output at its
last row) and every round's 7 draft logits and tokens. dspark caches the same committed rows, runs
its chain at each round's anchor and must reproduce the logits at the fp32 tolerance (observed max
error 1.4e-6 on logits up to 5.1), the last-row outputs (8e-7), and the greedy tokens exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dspark.checkpoint.eagle3 import load_eagle3_draft
from dspark.config import Eagle3Config
from dspark.draft.eagle3 import Eagle3Draft
from tests.compare import assert_close

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "eagle3_golden"


CASES = {"qwen3": GOLDEN, "gemma4": GOLDEN / "gemma4"}


@pytest.fixture(scope="module", params=list(CASES))
def golden(request):
    return load_eagle3_draft(CASES[request.param] / "checkpoint"), load_file(CASES[request.param] / "golden.safetensors")


def test_checkpoint_config(golden):
    draft, _ = golden
    cfg = draft.config
    assert (cfg.target_layer_ids, cfg.num_target_layers, cfg.ttt_length) == ((0, 1, 2), 4, 7)
    assert draft.block_size == 7 and draft.tap_layers == (0, 1, 2)
    if cfg.kind == "qwen3":
        assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (64, 4, 2, 16, 512)
        assert cfg.rope_theta == 1e6 and not (cfg.k_eq_v or cfg.value_norm or cfg.sandwich_norms)
        return
    # Gemma4Eagle3Model: global_head_dim and num_global_key_value_heads (attention_k_eq_v), no v_proj,
    # proportional RoPE over a quarter of each head, sqrt(d) embeddings, soft-capped logits, a layer_scalar.
    assert (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (40, 4, 1, 20, 160)
    assert (cfg.k_eq_v, cfg.value_norm, cfg.sandwich_norms, cfg.attention_scale) == (True, True, True, 1.0)
    assert (cfg.rope_fraction, cfg.rope_theta, cfg.embed_scale, cfg.logit_softcap) == (0.25, 1e6, 40 ** 0.5, 15.0)
    assert cfg.hidden_act == "gelu_pytorch_tanh" and draft.layers[0].self_attn.v_proj is None
    assert not torch.equal(draft.layers[0].layer_scalar, torch.ones(1)), "the fixture's layer_scalar is random"


def test_reproduces_deepspec_rounds(golden):
    draft, g = golden
    rounds = g["draft_logits"].shape[0]
    keys, values, positions = [], [], []  # the committed rows so far, as DeepSpec's cropped draft cache holds them
    with torch.no_grad():
        for r in range(rounds):
            feats, nxt, pos = g[f"extend{r}_features"], g[f"extend{r}_next_ids"], g[f"extend{r}_positions"]
            assert int(nxt[-1]) == int(g["anchor_ids"][r]), "fixture layout: an extension ends with the next anchor"
            rows = draft.project_context(feats)
            k, v = draft.context_rows(rows, nxt, pos)
            keys.append(k), values.append(v), positions.append(pos)
            ctx_k, ctx_v, ctx_pos = torch.cat(keys)[:-1], torch.cat(values)[:-1], torch.cat(positions)[:-1]
            assert torch.equal(ctx_pos, torch.arange(len(ctx_pos)))
            valid = torch.ones(1, len(ctx_pos), dtype=torch.bool)

            # the extension's last row (DeepSpec's draft_hidden) is dspark's chain step 0
            h, _, _ = draft.step(rows[-1:], nxt[-1:], pos[-1:], ctx_k[None], ctx_v[None], valid)
            assert_close(h[0], g[f"extend{r}_last_hidden"], what=f"round {r}: last committed row's output")

            tokens, logits = draft.chain(rows[-1:], nxt[-1:], pos[-1:] + 1, ctx_k[None], ctx_v[None], valid,
                                         draft.block_size, lambda k, lg: lg.argmax(-1))
            assert_close(logits[0], g["draft_logits"][r], what=f"round {r}: draft logits")
            assert tokens[0].tolist() == g["draft_tokens"][r].tolist(), f"round {r}"


def test_config_refusals():
    base = dict(kind="qwen3", hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=16, rms_norm_eps=1e-6,
                rope_theta=1e4, vocab_size=32, target_layer_ids=(0, 1), num_target_layers=4, ttt_length=3)
    Eagle3Config(**base)
    for change, field in ((dict(num_kv_heads=3), "num_kv_heads"), (dict(head_dim=3), "head_dim"),
                          (dict(target_layer_ids=(1, 0)), "target_layer_ids"),
                          (dict(target_layer_ids=(0, 3)), "target_layer_ids"), (dict(ttt_length=0), "ttt_length"),
                          (dict(kind="llama"), "kind"), (dict(hidden_act="gelu"), "hidden_act"),
                          (dict(rope_fraction=0.0), "rope_fraction"), (dict(k_eq_v=1), "k_eq_v"),
                          (dict(attention_scale=-1.0), "attention_scale"), (dict(embed_scale=0), "embed_scale")):
        with pytest.raises(ValueError, match=field):
            Eagle3Config(**{**base, **change})
    draft = Eagle3Draft.random(Eagle3Config(**base))
    with pytest.raises(ValueError, match="width 7.*expects 16"):
        draft.project_context(torch.zeros(2, 7))


def test_invalid_context_rows_never_leak(golden):
    """Rows outside `valid` may hold anything (a ring slot's previous request, NaN included)."""
    draft, g = golden
    with torch.no_grad():
        feats, nxt, pos = g["extend0_features"], g["extend0_next_ids"], g["extend0_positions"]
        rows = draft.project_context(feats)
        k, v = draft.context_rows(rows, nxt, pos)
        args = (rows[-1:], nxt[-1:], pos[-1:] + 1)
        want = draft.chain(*args, k[None, :-1], v[None, :-1], torch.ones(1, 19, dtype=torch.bool), 7,
                           lambda i, lg: lg.argmax(-1))
        junk = torch.full((1, 5, *k.shape[1:]), float("nan"))
        got = draft.chain(*args, torch.cat([k[None, :-1], junk], 1), torch.cat([v[None, :-1], junk], 1),
                          torch.arange(24)[None] < 19, 7, lambda i, lg: lg.argmax(-1))
    assert torch.equal(got[0], want[0])
    assert_close(got[1], want[1], what="logits with masked junk rows")  # not bitwise: longer reductions
