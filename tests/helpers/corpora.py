"""Corpus-test helpers: files written under a fake machine root, the CorpusSources that read
them, and a tiny built corpus whose train and held-out splits each repeat one made-up word."""

from __future__ import annotations

from pathlib import Path

from dspark.data.corpus import CorpusSources, build_corpus, split_of


def first_in(split: str, pattern: str, fraction: float = 0.05) -> str:
    """The first relpath `pattern.format(i)` that falls in `split`."""
    return next(p for p in (pattern.format(i) for i in range(10_000)) if split_of(p, fraction) == split)


def write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def sources(root: Path, *, man: bool = False, doc: bool = True, pydoc: bool = False) -> CorpusSources:
    return CorpusSources(stdlib=root / "lib", site_packages=root / "site", man=root / "man" if man else None,
                         doc=root / "doc" if doc else None, pydoc_topics=pydoc)


def tokenizer_corpus(root: Path) -> tuple[Path, str, str]:
    """A corpus whose train split repeats one made-up word and whose held-out split another."""
    held = first_in("heldout", "stdlib/held{}.py")
    train = first_in("train", "stdlib/train{}.py")
    body = "def compute(value):\n    return value + 1\n"
    write(root / "lib" / held.removeprefix("stdlib/"), body + " zqxvbnheld" * 200 + "\n")
    write(root / "lib" / train.removeprefix("stdlib/"), body + " wrtplkjtrain" * 200 + "\n")
    for i in range(20):
        write(root / f"doc/p{i}/README", f"The quick brown fox jumps over lazy dog number {i}.\n" * 3)
    build_corpus(root / "corpus", sources=sources(root), progress=False)
    return root / "corpus", held, train
