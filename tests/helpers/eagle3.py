"""EAGLE-3 test fixtures: untrained drafts for tiny targets, the DeepSpec-layout checkpoint writer the
loader tests use, and the cache-free reference chain the engine's proposals are checked against."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from dspark.config import Eagle3Config
from dspark.draft.eagle3 import Eagle3Draft

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "eagle3_golden"


def tiny_eagle3_draft(target, *, taps=(1, 2), ttt_length: int = 4, seed: int = 1, favour=(2, 5)) -> Eagle3Draft:
    """An untrained EAGLE-3 draft for `target` (its hidden size, vocabulary and depth); LM-head rows
    `favour` are boosted like the peaked targets' so that some drafts are accepted (None: plain)."""
    cfg = target.config
    draft = Eagle3Draft.random(Eagle3Config(
        kind="qwen3", hidden_size=cfg.hidden_size, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=96, rms_norm_eps=1e-6,
        rope_theta=10000.0, vocab_size=cfg.vocab_size, target_layer_ids=tuple(taps), num_target_layers=cfg.num_layers,
        ttt_length=ttt_length), seed=seed).eval()
    if favour is not None:
        with torch.no_grad():
            draft.lm_head.weight[favour[0]:favour[1]] *= 20
    return draft


def save_eagle3_checkpoint(draft: Eagle3Draft, path: Path, *, drop=(), config_changes: dict | None = None,
                           extra: dict | None = None) -> Path:
    """Write `draft` the way DeepSpec saves one (the golden checkpoint's config.json with this draft's
    sizes; its state_dict names), less the tensors in `drop`, plus `extra` tensors and config changes."""
    cfg = draft.config
    config = json.loads((GOLDEN / "checkpoint" / "config.json").read_text())
    config.update(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                  target_layer_ids=list(cfg.target_layer_ids), num_target_layers=cfg.num_target_layers,
                  ttt_length=cfg.ttt_length, max_position_embeddings=cfg.max_position_embeddings,
                  rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
                  **(config_changes or {}))
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    tensors = {k: v.contiguous() for k, v in draft.state_dict().items() if k not in drop}
    save_file({**tensors, **(extra or {})}, str(path / "model.safetensors"))
    return path


@torch.no_grad()
def reference_chain(target, draft: Eagle3Draft, context: list[int], choose=None):
    """Cache-free: a dense target forward over the committed tokens context[:-1], every committed row
    rebuilt, the chain at the anchor context[-1] (greedy unless `choose`) → (tokens [γ], logits [γ, V])."""
    p = len(context) - 1
    out = target.run(torch.tensor([context[:-1]]), tap_layers=draft.tap_layers)
    g = draft.project_context(torch.cat([out.taps[layer][0] for layer in draft.tap_layers], dim=-1))  # [p, d]
    ids = torch.tensor(context)
    k, v = draft.context_rows(g[:-1], ids[1:p], torch.arange(p - 1))  # rows 0..p−2
    tokens, logits = draft.chain(g[-1:], ids[p:], torch.tensor([p]), k[None], v[None],
                                 torch.ones(1, p - 1, dtype=torch.bool), draft.block_size,
                                 choose or (lambda i, lg: lg.argmax(-1)))
    return tokens[0].tolist(), logits[0]
