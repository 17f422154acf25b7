"""Draft models, one module per layout: DeepSpec's Qwen3-style DSpark / DFlash drafts (`deepspec`),
the V4 release's `mtp.*` stages (`v4`), and the heads they share (`heads`: Markov, confidence,
the block sampler). `protocol` says what the engine's block drafter needs of a draft model."""

from dspark.draft.deepspec import DraftModel
from dspark.draft.v4 import V4DSparkDraft

__all__ = ["DraftModel", "V4DSparkDraft"]
