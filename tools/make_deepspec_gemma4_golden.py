"""Write tests/data/deepspec_gemma4_golden/: DeepSpec's Gemma-4-layout DSpark and DFlash drafts and their outputs,
all produced by DeepSpec's own code (deepseek-ai/DeepSpec, extracted from the local mirror).

Run with DeepSpec's pinned transformers (5.10.2: its Gemma 4 modules read `global_head_dim` and
`num_global_key_value_heads` as config attributes and pass `layer_type` to the rotary module, which 5.24 no
longer accepts), e.g. in a venv that shares this machine's torch:

    python -m venv --system-site-packages /tmp/venv510
    /tmp/venv510/bin/pip install --no-deps transformers==5.10.2 tokenizers==0.22.2 'huggingface-hub>=1.5,<2'
    /tmp/venv510/bin/python tools/make_deepspec_gemma4_golden.py

The only thing stubbed is `torch.utils.tensorboard` (DeepSpec's training logger imports it; no math uses it).
DeepSpec's checkpoint writer gathers an FSDP full state dict and calls `save_pretrained(dir, state_dict=...)` on
the draft with the torch.compile `_orig_mod.` prefix stripped; without FSDP the model's own `state_dict()` is that
full state dict, and the same `save_pretrained` call writes it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch

MIRROR = Path("/work/.mirror/deepseek-ai+DeepSpec/repo")
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "deepspec_gemma4_golden"
GAMMA, MASK, TAPS, CTX, NEW, SEQ = 5, 150, [0, 1, 2], 16, 3, 24
THRESHOLDS = [0.0, 0.3, 0.5, 0.7]
LOSS_HOLES = [0, 1, 2, 3, 4, 5, 14]
# Kept anchors ascending, then one dummy block (the sampler's layout): 7 and 16 full blocks, 10 and 12 cut by the
# loss-mask hole at 14, 19 / 21 / 22 cut by the sequence end.
ANCHORS, KEEP = [7, 10, 12, 16, 19, 21, 22, 0], [1, 1, 1, 1, 1, 1, 1, 0]
CASES = {
    # name: (attention_k_eq_v of the target, draft model args)
    "dspark": (True, dict(markov_rank=8, markov_head_type="vanilla", confidence_head_alpha=1.0,
                          confidence_head_with_markov=True, ce_loss_alpha=0.1, l1_loss_alpha=0.9)),
    "dflash": (False, dict(markov_rank=0, confidence_head_alpha=0.0, ce_loss_alpha=1.0, l1_loss_alpha=0.0)),
}


class Args(dict):
    """DeepSpec reads model args by attribute and tests keys with `in`."""
    __getattr__ = dict.__getitem__


def extract_deepspec(commit: str) -> tuple[Path, str]:
    tmp = Path(tempfile.mkdtemp(prefix="deepspec-"))
    sha = subprocess.run(["git", "-C", str(MIRROR), "rev-parse", commit], check=True, capture_output=True,
                         text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(MIRROR), "archive", sha, "deepspec"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    stub = types.ModuleType("torch.utils.tensorboard")
    stub.SummaryWriter = object
    sys.modules["torch.utils.tensorboard"] = stub
    sys.path.insert(0, str(tmp))
    return tmp, sha


def text_config(k_eq_v: bool):
    from transformers import Gemma4TextConfig

    # global_head_dim 20 with partial_rotary_factor 0.25: int(0.25 * 20 // 2) = 2 of the 10 pairs rotate.
    return Gemma4TextConfig(
        vocab_size=160, hidden_size=40, intermediate_size=56, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=20, num_global_key_value_heads=1,
        attention_k_eq_v=k_eq_v, hidden_size_per_layer_input=0, vocab_size_per_layer_input=160,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sliding_window=8, final_logit_softcapping=15.0, max_position_embeddings=256, rms_norm_eps=1e-6,
        tie_word_embeddings=False)  # untied (Gemma ties them) so that a swap of the two is caught


def randomize(model: torch.nn.Module, seed: int, skip=()) -> None:
    """linear ~N(0, 1/fan_in), embeddings ~N(0, 1), biases ~N(0, 0.25²), norm weights and layer_scalar ~U(0.5, 1.5)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in skip:
                continue
            module = model.get_submodule(name.rsplit(".", 1)[0])
            if "norm" in name.rsplit(".", 2)[-2]:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
            elif isinstance(module, torch.nn.Embedding):
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def margin(logits: torch.Tensor) -> torch.Tensor:
    top = logits.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def make_target(k_eq_v: bool, seed: int):
    from transformers import Gemma4Config, Gemma4ForCausalLM

    text = text_config(k_eq_v)
    target_config = Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=None)
    target = Gemma4ForCausalLM(text)
    target.config._attn_implementation = "eager"
    randomize(target, seed)
    with torch.no_grad():
        for p in target.parameters():
            p.copy_(bf16(p))  # a bf16 checkpoint upcast to fp32
    return target_config, target.eval()


def target_run(target, ids: torch.Tensor):
    from deepspec.modeling.dspark.common import extract_context_feature

    with torch.no_grad():
        out = target(input_ids=ids[None], output_hidden_states=True)
    feats = bf16(extract_context_feature(out.hidden_states, TAPS)[0])
    return feats, out.logits[0], bf16(out.hidden_states[-1][0])


def build_case(name: str, k_eq_v: bool, extra: dict, seed: int, out: Path) -> dict:
    from transformers import DynamicCache
    import deepspec.modeling.dspark.gemma4.modeling as g4
    from deepspec.eval.dspark import draft_ops
    from deepspec.modeling.dspark.gemma4 import Gemma4DSparkModel, build_draft_config
    from deepspec.modeling.dspark.loss import _collect_local_terms, compute_dspark_loss
    from deepspec.utils.sampling import logits_to_probs

    target_config, target = make_target(k_eq_v, 4321)
    gen = torch.Generator().manual_seed(777)
    prompt = torch.randint(3, MASK, (CTX,), generator=gen)
    ctx, logits, _ = target_run(target, prompt)
    anchor = logits[-1, :MASK].argmax().view(1)

    args = Args(target_model_name_or_path="target", block_size=GAMMA, num_draft_layers=2, target_layer_ids=TAPS,
                mask_token_id=MASK, num_anchors=len(ANCHORS), loss_decay_gamma=4.0, **extra)
    draft = Gemma4DSparkModel(build_draft_config(target_config, args))
    randomize(draft, seed, skip=("embed_tokens.weight", "lm_head.weight"))
    draft = draft.to(torch.bfloat16)
    draft.initialize_embeddings_and_head(embed_tokens=target.get_input_embeddings(),
                                         lm_head=target.get_output_embeddings(), freeze=True)
    ckpt = out / name / "checkpoint"
    state = {k.removeprefix("_orig_mod."): v for k, v in draft.state_dict().items()}
    draft.save_pretrained(ckpt, state_dict=state)
    for extra_file in ckpt.iterdir():
        if extra_file.name not in ("config.json", "model.safetensors"):
            extra_file.unlink()
    (out / name / "target_config.json").write_text(target_config.to_json_string())

    model = Gemma4DSparkModel.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    g: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        block = torch.full((GAMMA,), MASK)
        block[0] = anchor
        layer_outs = []
        hooks = [layer.register_forward_hook(lambda m, a, o: layer_outs.append(o[0])) for layer in model.layers]
        cache = DynamicCache()
        pos = torch.arange(CTX + GAMMA)
        h = draft_ops.forward_dspark_draft_block(model, draft_input_ids=block[None], position_ids=pos[None],
                                                 past_key_values_draft=cache, target_hidden_states=ctx[None],
                                                 start=CTX, block_size=GAMMA)
        for hook in hooks:
            hook.remove()
        U = model.compute_logits(h)
        prev_tf = torch.cat([anchor, torch.randint(3, MASK, (GAMMA - 1,), generator=gen)])
        g.update(ctx_features=ctx, anchor_id=anchor, anchor_pos=torch.tensor([CTX]), block_input_ids=block,
                 position_ids=pos, prev_ids_tf=prev_tf, h=h[0], U=U[0],
                 debug_ctx_proj=model.hidden_norm(model.fc(ctx)), debug_block_embed=model.embed_tokens(block))
        for i, o in enumerate(layer_outs):
            g[f"debug_layer{i}_out"] = o
        has_markov = model.markov_head is not None
        logits_tf = (model.markov_head.apply_block_logits(U[None], token_ids=prev_tf[None, None],
                                                          hidden_states=h[None])[0] if has_markov else U)
        g["logits_tf"] = logits_tf[0]
        g["probs_tf_t0p8"] = logits_to_probs(logits_tf, 0.8)[0]
        conf_tf = model.predict_confidence_step(h, prev_token_ids=prev_tf[None])
        tokens, logits_greedy = model.sample_draft_tokens(U, first_prev_token_ids=anchor, temperature=0.0,
                                                          hidden_states=h)
        g.update(greedy_tokens=tokens[0], logits_greedy=logits_greedy[0], greedy_margin=margin(logits_greedy[0]))
        conf_greedy = draft_ops._predict_confidence_logits(model, proposal_hidden_states=h, draft_input_ids=block[None],
                                                           sampled_tokens=tokens, block_size=GAMMA)
        if conf_tf is not None:
            g.update(conf_logits_tf=conf_tf[0], conf_probs_tf=conf_tf[0].sigmoid(),
                     conf_logits_greedy=conf_greedy[0], conf_probs_greedy=conf_greedy[0].sigmoid())
        g["conf_thresholds"] = torch.tensor(THRESHOLDS)
        g["proposal_lens"] = torch.tensor([
            draft_ops.build_dspark_proposal(model, draft_input_ids=block[None], block_hidden=h, block_size=GAMMA,
                                            temperature=0.0, confidence_threshold=tau).draft_token_count
            for tau in THRESHOLDS])

        # Round 2: two drafts accepted, the target's next greedy token is the new anchor.
        committed = torch.cat([prompt, anchor, tokens[0, :NEW - 1]])
        feats2, logits2, _ = target_run(target, committed)
        new = feats2[CTX:]
        anchor2 = logits2[-1, :MASK].argmax().view(1)
        block2 = torch.full((GAMMA,), MASK)
        block2[0] = anchor2
        start2 = CTX + NEW
        pos2 = torch.arange(start2 + GAMMA)
        h2 = draft_ops.forward_dspark_draft_block(model, draft_input_ids=block2[None], position_ids=pos2[None],
                                                  past_key_values_draft=cache, target_hidden_states=new[None],
                                                  start=start2, block_size=GAMMA)
        fresh = draft_ops.forward_dspark_draft_block(model, draft_input_ids=block2[None], position_ids=pos2[None],
                                                     past_key_values_draft=DynamicCache(),
                                                     target_hidden_states=torch.cat([ctx, new])[None],
                                                     start=start2, block_size=GAMMA)
        checks = {"round 2 through the cache vs a fresh call, max|h diff|": (h2 - fresh).abs().max().item()}
        U2 = model.compute_logits(h2)
        tokens2, logits_greedy2 = model.sample_draft_tokens(U2, first_prev_token_ids=anchor2, temperature=0.0,
                                                            hidden_states=h2)
        g.update(r2_ctx_features_new=new, r2_anchor_id=anchor2, r2_anchor_pos=torch.tensor([start2]),
                 r2_position_ids=pos2[CTX:], r2_h=h2[0], r2_U=U2[0], r2_greedy_tokens=tokens2[0],
                 r2_logits_greedy=logits_greedy2[0], r2_greedy_margin=margin(logits_greedy2[0]))
        conf2 = draft_ops._predict_confidence_logits(model, proposal_hidden_states=h2, draft_input_ids=block2[None],
                                                     sampled_tokens=tokens2, block_size=GAMMA)
        if conf2 is not None:
            g["r2_conf_logits_greedy"] = conf2[0]

    # Training: DeepSpec's forward with flex_attention and its anchor sampler replaced by fixed anchors.
    train_ids = torch.cat([prompt, torch.randint(3, MASK, (SEQ - CTX,), generator=gen)])
    train_ctx, _, train_last = target_run(target, train_ids)
    loss_mask = torch.ones(SEQ)
    loss_mask[LOSS_HOLES] = 0
    anchors, keep = torch.tensor([ANCHORS]), torch.tensor([KEEP], dtype=torch.bool)
    g4.sample_anchor_positions = lambda **kw: (anchors.clone(), keep.clone())
    train_model = Gemma4DSparkModel.from_pretrained(ckpt, dtype=torch.float32,
                                                    attn_implementation="flex_attention").eval()
    with torch.no_grad():
        o = train_model(train_ids[None], target_hidden_states=train_ctx[None], loss_mask=loss_mask[None],
                        target_last_hidden_states=train_last[None])
        terms, _ = _collect_local_terms(outputs=o, loss_decay_gamma=4.0, l1_loss_alpha=float(extra["l1_loss_alpha"]))
        loss = compute_dspark_loss(outputs=o, loss_decay_gamma=4.0, ce_loss_alpha=extra["ce_loss_alpha"],
                                   l1_loss_alpha=extra["l1_loss_alpha"],
                                   confidence_head_alpha=extra["confidence_head_alpha"])
    g.update(train_input_ids=train_ids, train_ctx_features=train_ctx, train_target_last_hidden=train_last,
             train_loss_mask=loss_mask, train_anchors=anchors[0], train_keep=keep[0].long(),
             train_draft_logits=o.draft_logits[0], train_target_ids=o.target_ids[0],
             train_eval_mask=o.eval_mask[0].long(), train_aligned_target_logits=o.aligned_target_logits[0],
             train_loss=loss.reshape(1))
    if o.confidence_pred is not None:
        g["train_confidence_pred"] = o.confidence_pred[0]
    for term, value in terms.items():
        g[f"train_{term}"] = value.reshape(1)
    kept = keep[0]
    # The inference path on each kept block (context rows 0..p-1) must agree with the training forward.
    with torch.no_grad():
        diff = 0.0
        for b in range(len(ANCHORS)):
            if not kept[b]:
                continue
            p = ANCHORS[b]
            blk = torch.full((GAMMA,), MASK)
            blk[0] = train_ids[p]
            hb = draft_ops.forward_dspark_draft_block(model, draft_input_ids=blk[None],
                                                      position_ids=torch.arange(p + GAMMA)[None],
                                                      past_key_values_draft=DynamicCache(),
                                                      target_hidden_states=train_ctx[None, :p], start=p,
                                                      block_size=GAMMA)
            Ub = model.compute_logits(hb)
            prev = torch.cat([train_ids[p:p + 1], o.target_ids[0, b, :-1]])
            if has_markov:
                Ub = model.markov_head.apply_block_logits(Ub[None], token_ids=prev[None, None],
                                                          hidden_states=hb[None])[0]
            diff = max(diff, (Ub[0] - o.draft_logits[0, b]).abs().max().item())
    checks["training forward vs the inference path per kept block, max|logit diff|"] = diff
    checks["greedy corrected logits vs apply_block_logits(prev = [anchor, greedy[:-1]]), max|diff|"] = (
        (model.markov_head.apply_block_logits(U[None], token_ids=torch.cat([anchor, tokens[0, :-1]])[None, None],
                                              hidden_states=h[None])[0] - logits_greedy).abs().max().item()
        if has_markov else 0.0)
    g = {k: (v.detach().float() if v.is_floating_point() else v.detach().long()).clone() for k, v in g.items()}
    return g, checks


def robust(g: dict) -> tuple[bool, dict]:
    """Discrete outputs must be safely reproducible in fp32."""
    stats = {"min_greedy_margin": min(g["greedy_margin"].min().item(), g["r2_greedy_margin"].min().item()),
             "distinct_greedy_tokens": len(set(g["greedy_tokens"].tolist()))}
    ok = stats["min_greedy_margin"] >= 0.05 and stats["distinct_greedy_tokens"] >= 3
    if "conf_probs_greedy" in g:
        gap = min(abs(c - t) for c in g["conf_probs_greedy"].tolist() for t in THRESHOLDS[1:])
        lens = g["proposal_lens"].tolist()
        stats.update(min_conf_gap_to_thresholds=gap, partial_proposal=any(0 < n < GAMMA for n in lens))
        ok = ok and gap >= 0.01 and stats["partial_proposal"]
    return ok, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--commit", default="HEAD")
    a = parser.parse_args()
    torch.manual_seed(0)
    tmp, sha = extract_deepspec(a.commit)
    import safetensors
    import transformers
    from safetensors.torch import save_file

    try:
        import torch.distributed as dist

        # compute_dspark_loss all-reduces its denominators: a one-process group on this machine.
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        a.out.mkdir(parents=True, exist_ok=True)
        for name in CASES:  # README.txt is written by hand and stays
            shutil.rmtree(a.out / name, ignore_errors=True)
        summary = {}
        for name, (k_eq_v, extra) in CASES.items():
            for seed in range(5000, 5100):
                g, checks = build_case(name, k_eq_v, extra, seed, a.out)
                ok, stats = robust(g)
                if ok:
                    break
            else:
                raise SystemExit(f"{name}: no seed gives robust discrete outputs")
            save_file(g, str(a.out / name / "golden.safetensors"), metadata={"format": "pt"})
            summary[name] = dict(seed=seed, checks=checks, robustness=stats, greedy_tokens=g["greedy_tokens"].tolist(),
                                 proposal_lens=g["proposal_lens"].tolist(),
                                 tensors={k: [str(v.dtype).removeprefix("torch."), list(v.shape)]
                                          for k, v in sorted(g.items())})
        summary["provenance"] = dict(deepspec_commit=sha, torch=torch.__version__,
                                     transformers=transformers.__version__, safetensors=safetensors.__version__)
        (a.out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        print(json.dumps({k: v.get("checks", v) for k, v in summary.items()}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
