"""Write tests/data/eagle3_golden/ with DeepSpec's own EAGLE-3 code (deepseek-ai/DeepSpec afdfa7c).

    python tools/make_eagle3_golden.py [--case qwen3|gemma4|all] [--mirror DIR] [--target DIR] [--out DIR]

DeepSpec's files are extracted from the bare git mirror with `git archive` into a temp dir and
imported from there. A tiny random EAGLE-3 draft is built for the golden tiny Qwen3 target
(deepspec_golden/target: 4 layers, hidden 64, vocabulary 512) with DeepSpec's `build_draft_config`
(taps [0, 1, 2], ttt_length 7, one draft layer), given the target's embedding and LM head exactly as
`Qwen3Eagle3Trainer.build_models` does, cast to bf16 and saved by DeepSpec's
`ckpt_manager._save_model_checkpoint`. The checkpoint is then loaded back in fp32 by
`Qwen3Eagle3Model.from_pretrained` and run by `Qwen3Eagle3Evaluator.generate_one_sample` (greedy,
the HF target in fp32 on CPU), recording every draft-cache extension's inputs and output and every
round's draft logits and tokens. Nothing in the golden outputs is computed by dspark.

The gemma4 case (into OUT/gemma4/) does the same with `Gemma4Eagle3Model` / `Gemma4Eagle3Evaluator` for a
tiny random Gemma 4 target built here with transformers' `Gemma4ForCausalLM` and saved beside it (bf16,
run in fp32): DeepSpec's Gemma 4 `build_draft_config` on the target's `Gemma4Config`, every draft weight but
the target's embedding and LM head random, the `layer_scalar` buffer too (DeepSpec keeps it at 1.0; random
here so that a reader ignoring it fails). Its seed is the first from GEMMA4_SEEDS whose greedy run accepts
drafts in two rounds and whose greedy draft argmaxes all win by at least MIN_MARGIN.

Run it under transformers 5.10.2 (the deepspec_golden fixture's version): DeepSpec's evaluator calls
`DynamicCache.crop(n)` with a positive n, which later transformers refuse. A venv does it:
`python -m venv --system-site-packages V && V/bin/pip install --no-deps transformers==5.10.2
tokenizers==0.22.2 huggingface-hub==1.33.0`, then `V/bin/python tools/make_eagle3_golden.py`.

Stubs, none of them in the math: `torch.utils.tensorboard` (DeepSpec's training logger imports it;
not installed), FSDP's full-state-dict gather and the distributed main-process test inside
`_save_model_checkpoint` (a single process, no FSDP), and DeepSpec's "exactly 5 target layers"
assertion in `validate_eagle3_target_layer_ids` (the tiny target has 4 layers and its last is not
tappable; the range and order checks still run).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path("/work/.mirror/deepseek-ai+DeepSpec/repo")
COMMIT = "afdfa7c"
# Seed 2 is the first whose greedy run has accepted drafts (rounds 6 and 8 commit two rows each),
# so the draft-cache extension of several committed rows is in the fixture; 14 new tokens keep it
# under 500 KB.
TAPS, TTT, NEW_TOKENS, SEED = [0, 1, 2], 7, 14, 2
# gemma4: the target's weights (seed 4321, as tools/make_deepspec_gemma4_golden.py), the draft's first robust seed.
GEMMA4_TARGET_SEED, GEMMA4_SEEDS, MIN_MARGIN = 4321, range(100, 200), 2e-3


def extract(mirror: Path, dest: Path) -> None:
    archive = subprocess.run(["git", "-C", str(mirror), "archive", COMMIT, "deepspec"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "x", "-C", str(dest)], input=archive, check=True)


def stub_unrelated_modules() -> None:
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = object
    sys.modules["torch.utils.tensorboard"] = tensorboard


def validate_without_count(layer_ids, num_target_layers):
    layer_ids = [int(x) for x in layer_ids]
    assert all(0 <= x < num_target_layers for x in layer_ids)
    assert all(a < b for a, b in zip(layer_ids, layer_ids[1:]))
    return layer_ids


def build_draft(target, *, case: str = "qwen3", target_config=None, seed: int = SEED):
    """DeepSpec's draft for `target` (`target_config`: the config build_draft_config reads, default the target's)."""
    if case == "qwen3":
        from deepspec.modeling.eagle3.qwen3 import Qwen3Eagle3Model as model_cls
        from deepspec.modeling.eagle3.qwen3 import config as draft_config
        target_name = "deepspec_golden/target"
    else:
        from deepspec.modeling.eagle3.gemma4 import Gemma4Eagle3Model as model_cls
        from deepspec.modeling.eagle3.gemma4 import config as draft_config
        target_name = "eagle3_golden/gemma4/target"
    draft_config.validate_eagle3_target_layer_ids = validate_without_count
    args = SimpleNamespace(target_model_name_or_path=target_name, target_layer_ids=TAPS,
                           ttt_length=TTT, step_loss_decay=0.8, draft_num_hidden_layers=1)
    draft = model_cls(draft_config.build_draft_config(target_config=target_config or target.config, model_args=args))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # linear N(0, 1/fan_in), norm weights U(0.5, 1.5); embedding and head below
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
        for name, b in draft.named_buffers():
            if name.endswith("layer_scalar"):  # Gemma 4 only
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    # Qwen3Eagle3Trainer.build_models: frozen copies of the target's embedding and LM head.
    draft.initialize_embeddings_and_head(embed_tokens=target.get_input_embeddings(),
                                         lm_head=target.get_output_embeddings(), freeze=True)
    return draft


def save_with_deepspec(draft, checkpoint: Path) -> None:
    from deepspec.trainer import ckpt_manager

    ckpt_manager._full_model_state_dict = lambda model: model.state_dict()  # no FSDP wrapper here
    ckpt_manager.is_global_main_process = lambda: True
    checkpoint.mkdir(parents=True, exist_ok=True)
    ckpt_manager._save_model_checkpoint(model=draft, draft_model=draft, checkpoint_dir=str(checkpoint))


def run_evaluator(target, checkpoint: Path, prompt: torch.Tensor, case: str = "qwen3") -> dict[str, torch.Tensor]:
    from deepspec.eval.eagle3.evaluator import Gemma4Eagle3Evaluator, Qwen3Eagle3Evaluator

    evaluator_cls = Qwen3Eagle3Evaluator if case == "qwen3" else Gemma4Eagle3Evaluator
    draft = evaluator_cls.draft_model_cls.from_pretrained(
        str(checkpoint), dtype=torch.float32, attn_implementation=evaluator_cls.EVAL_ATTN_IMPLEMENTATION).eval()
    evaluator = object.__new__(evaluator_cls)  # no dist init, no model download: set what it reads
    evaluator.args = SimpleNamespace(temperature=0.0, max_new_tokens=NEW_TOKENS)
    evaluator.target_model, evaluator.draft_model = target, draft

    extends, logits, proposals = [], [], []
    extend, compute_logits, propose = draft.extend_draft_cache, draft.compute_logits, evaluator._propose

    def recording_extend(hidden_states, input_ids, position_ids, past_key_values):
        out = extend(hidden_states=hidden_states, input_ids=input_ids, position_ids=position_ids,
                     past_key_values=past_key_values)
        extends.append((hidden_states[0].clone(), input_ids[0].clone(), position_ids[0].clone(), out[0, -1].clone()))
        return out

    def recording_logits(hidden_states):
        out = compute_logits(hidden_states)
        logits.append(out[0, -1].clone())
        return out

    def recording_propose(**kw):
        proposal = propose(**kw)
        proposals.append(proposal.verify_input_ids[0].clone())
        return proposal

    draft.extend_draft_cache, draft.compute_logits = recording_extend, recording_logits
    evaluator._propose = recording_propose
    with torch.inference_mode():
        result = evaluator.generate_one_sample(input_ids=prompt[None], stop_token_ids=None)

    rounds = len(proposals)
    assert len(extends) == rounds + 1 and len(logits) == rounds * TTT  # the init, then an update after each round
    golden = {"prompt_ids": prompt, "output_ids": result.output_ids[0].clone(),
              "accepted": torch.tensor(result.accepted_draft_lengths), "draft_logits": torch.stack(logits).view(
                  rounds, TTT, -1), "draft_tokens": torch.stack([p[1:] for p in proposals]),
              "anchor_ids": torch.stack([p[0] for p in proposals])}
    for i, (features, ids, positions, hidden) in enumerate(extends):
        golden[f"extend{i}_features"] = features
        golden[f"extend{i}_next_ids"] = ids
        golden[f"extend{i}_positions"] = positions
        golden[f"extend{i}_last_hidden"] = hidden
    return golden


def gemma4_target(out: Path):
    """A tiny random Gemma 4 target saved to `out` in bf16 and loaded back in fp32 → (its Gemma4Config, the model)."""
    import warnings

    from transformers import AutoModelForCausalLM, Gemma4Config, Gemma4ForCausalLM, Gemma4TextConfig

    # Sliding (window 8) and full layers in turn, k_eq_v full layers (one global KV head, global_head_dim 20,
    # proportional RoPE 0.25: 2 of the 10 pairs rotate, as the Gemma4TextConfig default), soft-capped logits;
    # untied embedding and head (Gemma ties them) so that a swap of the two is caught.
    text = Gemma4TextConfig(
        vocab_size=160, hidden_size=40, intermediate_size=56, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=20, num_global_key_value_heads=1, attention_k_eq_v=True,
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=160,
        layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=8, final_logit_softcapping=15.0,
        max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=2, eos_token_id=1,
        pad_token_id=0)
    model = Gemma4ForCausalLM(text)
    gen = torch.Generator().manual_seed(GEMMA4_TARGET_SEED)
    with torch.no_grad():  # linear N(0, 1/fan_in), embedding N(0, 1), norm weights and layer_scalar U(0.5, 1.5)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.to(torch.bfloat16).save_pretrained(out)
    (out / "generation_config.json").unlink(missing_ok=True)
    target = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="sdpa").eval()
    return Gemma4Config(text_config=text.to_dict(), vision_config=None, audio_config=None), target


def min_margin(golden: dict) -> float:
    top = golden["draft_logits"].topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


def make_case(case: str, out: Path, target_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    if case == "qwen3":
        target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32,
                                                      attn_implementation="sdpa").eval()
        draft = build_draft(target).to(torch.bfloat16)
        save_with_deepspec(draft, out / "checkpoint")
        prompt = load_file(str(target_dir / "golden_target.safetensors"))["prompt_ids"]
        return run_evaluator(target, out / "checkpoint", prompt)
    target_config, target = gemma4_target(out / "target")
    prompt = torch.randint(3, 160, (20,), generator=torch.Generator().manual_seed(GEMMA4_TARGET_SEED))
    for seed in GEMMA4_SEEDS:
        draft = build_draft(target, case=case, target_config=target_config, seed=seed).to(torch.bfloat16)
        save_with_deepspec(draft, out / "checkpoint")
        golden = run_evaluator(target, out / "checkpoint", prompt, case=case)
        if (golden["accepted"][:-1] > 0).sum() >= 2 and min_margin(golden) >= MIN_MARGIN:
            print(f"gemma4 draft seed {seed}")
            return golden
    raise SystemExit(f"no draft seed in {GEMMA4_SEEDS} is robust")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=("qwen3", "gemma4", "all"), default="all")
    parser.add_argument("--mirror", type=Path, default=MIRROR)
    parser.add_argument("--target", type=Path, default=REPO.parent / "shared" / "data" / "deepspec_golden" / "target",
                        help="the qwen3 case's target (the gemma4 case builds its own)")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "eagle3_golden")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        extract(args.mirror, Path(tmp))
        sys.path.insert(0, tmp)
        stub_unrelated_modules()
        import transformers

        if transformers.__version__ != "5.10.2":
            raise SystemExit(f"transformers {transformers.__version__}: run under 5.10.2 (see the docstring)")
        for case in ("qwen3", "gemma4") if args.case == "all" else (args.case,):
            out = args.out if case == "qwen3" else args.out / "gemma4"
            golden = make_case(case, out, args.target)
            save_file({k: v.contiguous() for k, v in golden.items()}, str(out / "golden.safetensors"))
            print(f"{case}: rounds {len(golden['accepted'])}, accepted {golden['accepted'].tolist()}, "
                  f"min greedy margin {min_margin(golden):.4f}")
            print("output", golden["output_ids"][len(golden['prompt_ids']):].tolist())


if __name__ == "__main__":
    main()
