"""A nano run directory as the eval harness reads it: its target, the drafts the methods need, the
DSpark block size k, and its held-out documents.

Eval methods are labels over the decoding registry (dspark.decode.methods) plus a γ: `ar`, `ngram`
(prompt lookup, γ = k), `mtp-1`, `mtp-k` (the target's MTP chained 1 and k times) and every method
of the registry that needs a trained draft, drafting its whole block.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from dspark import checkpoint
from dspark.data.tokenizer import tokenize_corpus
from dspark.decode.methods import draft_methods

# Alphabetical: the DFlash baselines before DSpark, as the table reads.
DRAFT_METHODS = tuple(sorted(draft_methods()))
METHODS = ("ar", "ngram", "mtp-1", "mtp-k") + DRAFT_METHODS


def registry_method(method: str) -> str:
    """The decoding method (dspark.decode.methods) behind an eval label."""
    if method not in METHODS:
        raise ValueError(f"unknown eval method {method!r}; expected one of {', '.join(METHODS)}")
    return "mtp" if method.startswith("mtp") else method


@dataclass
class Run:
    """A nano run directory's models: the target, the drafts the methods need, k."""

    path: Path
    target: object  # DeepseekV4
    drafts: dict[str, object]  # method → DraftModel / V4DSparkDraft
    k: int  # the DSpark block size: γ of mtp-k and ngram

    def gamma(self, method: str) -> int:
        if method == "ar":
            return 0
        if method == "mtp-1":
            return 1
        if method in ("mtp-k", "ngram"):
            return self.k
        return self.drafts[method].block_size


def _missing_stages(run: Path, methods: tuple[str, ...]) -> list[str]:
    """The run's stages that `methods` need and that are absent, as 'what (path)'."""
    need = [("corpus stage", "corpus/manifest.json"), ("tokenizer stage", "tokenizer/tokenizer.json"),
            ("target stage", "target/final/config.json")]
    need += [(f"{m} draft", f"drafts/{m}/draft/config.json") for m in methods if m in DRAFT_METHODS]
    return [f"{what} ({rel})" for what, rel in need if not (run / rel).exists()]


def load_run(run_dir: str | Path, methods: tuple[str, ...] = METHODS) -> Run:
    """Load what `methods` need from a nano run directory; missing stages are named in the error."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"no run directory at {run}")
    missing = _missing_stages(run, methods)
    if missing:
        raise ValueError(f"{run} lacks the {', the '.join(missing)}; finish the run with "
                         f"`dspark train-nano --out {run}` (add --smoke for a smoke run)")
    target = checkpoint.load_target(run / "target" / "final").eval()
    if any(m.startswith("mtp") for m in methods) and not target.has_mtp:
        raise ValueError(f"{run}/target/final has no MTP module (its checkpoint carries none under mtp.*)")
    drafts = {}
    for method in methods:
        if method in DRAFT_METHODS:
            where = run / "drafts" / method / "draft"
            draft = checkpoint.load_draft(where, target)
            drafts[method] = draft.eval()
    dspark_dir = run / "drafts" / "dspark" / "draft"
    if (dspark_dir / "config.json").exists():
        k = checkpoint.read_draft_config(dspark_dir).block_size
    elif target.config.dspark is not None:
        k = target.config.dspark.block_size
    else:
        raise ValueError(f"{run} names no DSpark block size (no drafts/dspark draft, no dspark_* target fields)")
    return Run(run, target, drafts, k)


def _file_key(relpath: str) -> str:
    return hashlib.sha256(f"eval:{relpath}".encode("utf-8")).hexdigest()


def heldout_files(run: Run, domain: str, count: int, min_tokens: int) -> list[tuple[str, torch.Tensor]]:
    """Up to `count` held-out documents of `domain` with at least `min_tokens` tokens (eos included),
    as (relpath, int64 ids), chosen in sha256 order of their relpaths (deterministic, unbiased by name)."""
    docs = tokenize_corpus(run.path / "corpus", run.path / "tokenizer", "heldout", domain)
    docs = sorted(docs, key=lambda d: _file_key(d[0]))
    picked = [(rel, ids.long()) for rel, ids in docs if len(ids) >= min_tokens][:count]
    if not picked:
        raise ValueError(f"{run.path}: no held-out {domain} document has {min_tokens} tokens "
                         f"({len(docs)} held-out {domain} documents); lower --prompt-tokens")
    return picked
