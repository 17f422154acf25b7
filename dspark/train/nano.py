"""The nano recipe: the embedded default model, trained from text found on this machine.

Stages, each resumable (a finished stage is skipped, an interrupted one continues from its
checkpoint) and deterministic for a seed:

    corpus      stdlib code + man / doc / pydoc prose, split by a hash of each file's path
    tokenizer   byte-level BPE on the train split
    data        train and held-out token chunks per domain (code and prose, equal shares)
    target      a small V4 with every part real (CSA with an indexer top-k below the entry count,
                HCA at rate ≤ 32, sequences ≥ 1024 in the full recipe), MTP trained jointly,
                indexer distillation, aux-loss-free expert balancing
    drafts      DSpark and DFlash at γ = 7 (DeepSpec layout), DFlash + L1, and the V4-layout DSpark
                at γ = 5, all with the same budget; confidence heads calibrated with STS
    export      bf16 weights, tokenizer and drafts into one directory (`dspark/assets/nano` ships)

`NanoRecipe.full()` is the committed run; `NanoRecipe.smoke()` runs every stage at toy size in
about a minute (CI checks its determinism and resume).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dspark import checkpoint
from dspark.config import DSparkFields, ModelConfig, RopeConfig, TrainConfig
from dspark.data.corpus import DOMAINS, build_corpus
from dspark.data.pack import pack_documents
from dspark.data.tokenizer import tokenize_corpus, train_tokenizer
from dspark.train.data import SequenceData
from dspark.train.pretrain import PretrainConfig, TargetTrainer
from dspark.train.recipe import KINDS, calibrate_draft, new_draft, train_draft
from dspark.model.target import DeepseekV4
from dspark.train.trainer import weights_hash

DRAFT_KINDS = KINDS  # every draft kind (= block method) the recipe trains and ships
NOISE_TOKEN = 3  # <|mask|> of the nano tokenizer (dspark.data.tokenizer.SPECIAL_TOKENS)


@dataclass(frozen=True)
class NanoRecipe:
    # corpus and tokenizer
    max_files: int | None = None  # documents per domain (None: all)
    max_bytes: int = 1 << 20  # per document
    vocab_size: int = 8192
    # target architecture
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 64
    rope_head_dim: int = 16
    q_lora_rank: int = 96
    o_lora_rank: int = 64
    sliding_window: int = 128
    hca_rate: int = 32
    index_n_heads: int = 16
    index_head_dim: int = 32
    index_topk: int = 32  # < 256 CSA entries of a 1024-token sequence
    n_routed_experts: int = 8
    moe_intermediate_size: int = 192
    max_position_embeddings: int = 4096
    # target training
    seq_len: int = 1024
    target_steps: int = 2000
    target_batch: int = 1
    target_lr: float = 2e-3
    # drafts (equal budgets)
    draft_steps: int = 400
    draft_batch: int = 2
    draft_seq_len: int = 512
    draft_anchors: int = 32
    draft_lr: float = 2e-3
    draft_layers: int = 2
    markov_rank: int = 32
    calibrate_prompts: int = 48
    seed: int = 42
    threads: int = 1  # torch CPU threads: float sums depend on them, so hashes repeat only at equal counts

    @classmethod
    def full(cls) -> "NanoRecipe":
        return cls()

    @classmethod
    def smoke(cls) -> "NanoRecipe":
        """Every stage at toy size (about a minute on 2 cores)."""
        return cls(max_files=24, max_bytes=16 << 10, vocab_size=512, hidden_size=48, head_dim=16, rope_head_dim=8,
                   q_lora_rank=32, o_lora_rank=16, sliding_window=32, hca_rate=16, index_n_heads=16,
                   index_head_dim=16, index_topk=4, moe_intermediate_size=32, max_position_embeddings=512,
                   seq_len=96, target_steps=8, target_batch=2, draft_steps=6, draft_batch=2, draft_seq_len=64,
                   draft_anchors=8, markov_rank=8, calibrate_prompts=4)

    def target_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(
            vocab_size=vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
            head_dim=self.head_dim, rope_head_dim=self.rope_head_dim, q_lora_rank=self.q_lora_rank, o_groups=2,
            o_lora_rank=self.o_lora_rank, sliding_window=self.sliding_window,
            layer_types=("sliding", "csa", "hca", "csa")[: self.num_layers], csa_rate=4, hca_rate=self.hca_rate,
            index_n_heads=self.index_n_heads, index_head_dim=self.index_head_dim, index_topk=self.index_topk,
            hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, rms_norm_eps=1e-6,
            mlp_layer_types=("hash",) + ("score",) * (self.num_layers - 1), n_routed_experts=self.n_routed_experts,
            num_experts_per_tok=2, moe_intermediate_size=self.moe_intermediate_size, scoring_func="sqrtsoftplus",
            routed_scaling_factor=1.5, swiglu_limit=10.0, main_rope=RopeConfig(theta=10000.0),
            compress_rope=RopeConfig(theta=160000.0, kind="yarn", factor=4.0,
                                     original_max_position=self.max_position_embeddings // 4),
            max_position_embeddings=self.max_position_embeddings, mtp_kind="mtp", num_mtp_layers=1,
            dspark=DSparkFields(block_size=5, noise_token_id=NOISE_TOKEN,
                                target_layer_ids=tuple(range(max(0, self.num_layers - 3), self.num_layers)),
                                markov_rank=self.markov_rank),
            bos_token_id=0, eos_token_ids=(1,))


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[nano] {message}", flush=True)


def _chunks(out: Path, name: str, docs, seq_len: int) -> list[torch.Tensor]:
    file = out / f"{name}.safetensors"
    if file.exists():
        return list(load_file(str(file))["chunks"].long().unbind(0))
    chunks, _ = pack_documents(docs, seq_len)
    save_file({"chunks": torch.stack(chunks)}, str(file))
    return [c.long() for c in chunks]


def _balanced(code: list[torch.Tensor], prose: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """All code chunks and as many prose chunks (prose outweighs code ~3:1 on a typical machine)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(prose), generator=g)[: max(len(code), 1)].sort().values.tolist()
    return code + [prose[i] for i in keep]


def run(recipe: NanoRecipe, out_dir: str | Path, *, progress: bool = True, stop_target_after: int | None = None
        ) -> dict[str, str]:
    """Run (or resume) every stage into `out_dir`; returns the weights hashes of the trained models."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=1) + "\n")
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    started = time.perf_counter()

    corpus_dir = out / "corpus"
    if not (corpus_dir / "manifest.json").exists():
        _say(progress, "building the corpus")
        build_corpus(corpus_dir, max_files=recipe.max_files, max_bytes=recipe.max_bytes, progress=progress)
    tok_dir = out / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        _say(progress, "training the tokenizer")
        train_tokenizer(corpus_dir, tok_dir, recipe.vocab_size, progress=progress)
    from dspark.text import load_tokenizer

    vocab = load_tokenizer(tok_dir).vocab_size

    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    chunks = {}
    for split in ("train", "heldout"):
        for domain in DOMAINS:
            docs = None if (data_dir / f"{split}-{domain}.safetensors").exists() else \
                tokenize_corpus(corpus_dir, tok_dir, split, domain)
            chunks[split, domain] = _chunks(data_dir, f"{split}-{domain}", docs, recipe.seq_len + 1)
    train_chunks = _balanced(chunks["train", "code"], chunks["train", "prose"], recipe.seed)
    _say(progress, f"{len(train_chunks)} training chunks of {recipe.seq_len + 1} tokens, vocabulary {vocab}")

    # ---------------------------------------------------------------- target
    target_dir = out / "target"
    final_target = target_dir / "final"
    target = DeepseekV4.random(recipe.target_config(vocab), seed=recipe.seed)
    if (final_target / "config.json").exists():
        checkpoint.load_weights(target, final_target)
    else:
        _say(progress, f"pretraining the target ({recipe.target_steps} steps)")
        cfg = TrainConfig(steps=recipe.target_steps, batch_size=recipe.target_batch, seq_len=recipe.seq_len + 1,
                          lr=recipe.target_lr, seed=recipe.seed, checkpoint_every=max(recipe.target_steps // 20, 1))
        trainer = TargetTrainer(target.train(), SequenceData(train_chunks, recipe.seq_len + 1), cfg, PretrainConfig(),
                                target_dir)
        trainer.train(progress=progress, stop_after=stop_target_after)
        if trainer.step < recipe.target_steps:
            return {"target": weights_hash(target), "stopped_at": str(trainer.step)}
        checkpoint.save(target.eval(), final_target)
    target.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    hashes = {"target": weights_hash(target)}

    # ---------------------------------------------------------------- drafts
    draft_data = SequenceData([c[: recipe.draft_seq_len] for c in train_chunks], recipe.draft_seq_len)
    g = torch.Generator().manual_seed(recipe.seed + 1)
    heldout = chunks["heldout", "code"] + chunks["heldout", "prose"]
    prompts = [heldout[i][:32].tolist() for i in torch.randperm(len(heldout), generator=g)[: recipe.calibrate_prompts]]
    for kind in DRAFT_KINDS:
        kind_dir = out / "drafts" / kind
        draft = new_draft(target, kind, recipe.seed, layers=recipe.draft_layers, **(
            {} if kind == "dspark-v4" else dict(block_size=7, markov_rank=recipe.markov_rank,
                                                mask_token_id=NOISE_TOKEN)))
        if (kind_dir / "draft" / "config.json").exists():
            checkpoint.load_weights(draft, kind_dir / "draft")
        else:
            _say(progress, f"training the {kind} draft ({recipe.draft_steps} steps)")
            cfg = TrainConfig(steps=recipe.draft_steps, batch_size=recipe.draft_batch, seq_len=recipe.draft_seq_len,
                              num_anchors=recipe.draft_anchors, lr=recipe.draft_lr, seed=recipe.seed,
                              checkpoint_every=max(recipe.draft_steps // 10, 1))
            train_draft(target, draft, draft_data, cfg, kind, kind_dir, progress=progress)
            if kind.startswith("dspark") and prompts:
                _say(progress, f"calibrating the {kind} confidence head")
                calibrate_draft(target, draft.eval(), prompts, kind_dir, max_tokens=48, seed=recipe.seed)
        hashes[kind] = weights_hash(draft)

    (out / "hashes.json").write_text(json.dumps(hashes, indent=1) + "\n")
    _say(progress, f"done in {time.perf_counter() - started:.0f} s")
    return hashes


def export(out_dir: str | Path, dest: str | Path) -> Path:
    """Copy a finished run into a shippable directory: target (bf16), tokenizer, drafts, manifests."""
    out, dest = Path(out_dir), Path(dest)
    if not (out / "hashes.json").exists():
        raise ValueError(f"{out} holds no finished nano run (hashes.json missing)")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    checkpoint.save(checkpoint.load_target(out / "target" / "final", dtype=torch.bfloat16), dest / "target")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(out / "tokenizer" / name, dest / "target" / name)
    target = checkpoint.load_target(dest / "target")
    for kind in DRAFT_KINDS:
        src, dst = out / "drafts" / kind / "draft", dest / "drafts" / kind
        if kind == "dspark-v4":
            checkpoint.save(checkpoint.load_v4_draft(src, target, dtype=torch.bfloat16), dst)
        else:  # bf16, and without the copies of the target's embedding and head (taken from the target)
            checkpoint.save_deepspec_draft(checkpoint.load_deepspec_draft(src, dtype=torch.bfloat16), dst,
                                           include_shared=False)
        if (src / "sts.json").exists():
            shutil.copy(src / "sts.json", dst / "sts.json")
    for name in ("recipe.json", "hashes.json"):
        shutil.copy(out / name, dest / name)
    manifest = json.loads((out / "corpus" / "manifest.json").read_text())
    (dest / "corpus_manifest.json").write_text(json.dumps(manifest, indent=0) + "\n")
    digest = hashlib.sha256((dest / "target" / "model.safetensors").read_bytes()).hexdigest()
    (dest / "README.txt").write_text(
        "The embedded nano model: a small DeepSeek-V4-layout target and its draft models, trained on this\n"
        "machine's text by `dspark train-nano` (recipe.json). hashes.json hashes the run's fp32 weights;\n"
        f"the bf16 target/model.safetensors shipped here has sha256 {digest}.\n"
        "Reproduce: dspark train-nano --out runs/nano --export dspark/assets/nano\n")
    return dest
