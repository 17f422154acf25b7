"""The one registry of decoding methods: name → drafter class, whether it needs a trained draft or
the target's MTP module, and how many tokens it drafts per round by default.

Every caller (Engine, LLM, the CLI, eval, benchmarks) looks methods up here; nothing else lists
their names. A `Method` object may stand in for a name wherever a method is taken (the engine builds its drafter
all the same): that is how tests plug in oracle and deliberately wrong drafters.
The block methods (dspark, dflash, dflash-l1, dspark-v4) share one drafter and differ
in the draft they are given (a bundle keeps each under `drafts/<method>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dspark.decode.block import BlockDrafter
from dspark.decode.drafter import Drafter
from dspark.decode.eagle3 import Eagle3Drafter
from dspark.decode.mtp import MTPDrafter
from dspark.decode.ngram import NgramDrafter
from dspark.draft.deepspec import DraftModel
from dspark.draft.eagle3 import Eagle3Draft
from dspark.draft.v4 import V4DSparkDraft


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[..., Drafter]  # (target, cache, draft, num_draft_tokens, max_batch, max_seq_len) → the drafter
    needs_draft: bool  # a trained draft model (DSpark / DFlash, either layout)
    needs_mtp: bool  # the target's MTP module, and the MTP window ring in the target cache
    default_draft_tokens: int | None  # γ when none is asked for; None: the draft's block size
    help: str
    trainable: bool = True  # for draft methods: our recipe trains the draft (train-draft --kind, nano's bundle)

    def draft_tokens(self, draft, requested: int | None) -> tuple[int, int]:
        """(γ drafted per round, most drafts verified per round) for `requested` (None: the default).

        A trained draft always drafts its whole block; `requested` then caps how much is verified."""
        if self.needs_draft:
            gamma = draft.block_size
            if requested is not None and not 0 <= requested <= gamma:
                raise ValueError(f"num_draft_tokens {requested} is outside the draft's block [0, {gamma}]")
            return gamma, gamma if requested is None else requested
        gamma = self.default_draft_tokens if requested is None else requested
        if self.name == "ar" and gamma != 0:
            raise ValueError("method 'ar' drafts nothing: num_draft_tokens must be 0 or None")
        if self.name != "ar" and gamma < 1:
            raise ValueError(f"method {self.name!r} needs num_draft_tokens >= 1, got {gamma}")
        return gamma, gamma


_BLOCK = "a trained block draft shipped with the model (drafts/{}) proposes"
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("ar", Drafter.build, False, False, 0, "plain autoregressive decoding"),
    Method("mtp", MTPDrafter.build, False, True, 1, "the target's own MTP module, chained k times (k = 1: MTP-1)"),
    Method("ngram", NgramDrafter.build, False, False, 4, "prompt lookup: what followed the context's last n-gram"),
    Method("dspark", BlockDrafter.build, True, False, None, "DSpark: " + _BLOCK.format("dspark") + " a block, "
           "Markov head and confidences"),
    Method("dflash", BlockDrafter.build, True, False, None, "DFlash: " + _BLOCK.format("dflash") + " a parallel block"),
    Method("dflash-l1", BlockDrafter.build, True, False, None, "DFlash trained with the L1 term"),
    Method("dspark-v4", BlockDrafter.build, True, False, None, "DSpark in the V4 release layout (mtp.* stages)"),
    Method("eagle3", Eagle3Drafter.build, True, False, None, "EAGLE-3 (DeepSpec's layout): a one-layer draft over "
           "fused target taps chains ttt_length tokens", trainable=False),
)}


def get(name: str | Method) -> Method:
    """The registered method `name`; a `Method` itself is returned as it is (tests and experiments
    plug their own drafters in this way, built by the engine like every other)."""
    if isinstance(name, Method):
        return name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def draft_methods() -> tuple[str, ...]:
    """The draft kinds our recipe trains (eagle3 drafts come from DeepSpec's releases, not from us)."""
    return tuple(name for name, m in METHODS.items() if m.needs_draft and m.trainable)


def draft_method(draft) -> str:
    """The decoding method of a draft `checkpoint.load_draft` built: its class and heads, which the
    loader chose from config.json (DeepSpec's architectures / the V4 release's mtp.* stages)."""
    if isinstance(draft, V4DSparkDraft):
        return "dspark-v4"
    if isinstance(draft, DraftModel):
        # A DeepSpec config names one architecture for both; DSpark is the one with a Markov head.
        return "dspark" if draft.has_markov_head else "dflash"
    if isinstance(draft, Eagle3Draft):
        return "eagle3"
    raise ValueError(f"no decoding method is known for a {type(draft).__name__} draft")


__all__ = ["METHODS", "Method", "draft_method", "draft_methods", "get"]
