"""The nano model's corpus: text found on any machine, split into train and held-out, on disk.

Two domains, both read from the machine itself (nothing is downloaded):

    code   *.py of the running interpreter's standard library (relpath `stdlib/<path>`), optionally
           installed packages' sources (`site-packages/<path>`). Test suites, `__pycache__`,
           `pydoc_data` (its topics are prose, below) and the build-specific `_sysconfigdata_*`
           are left out.
    prose  manual pages of sections 1, 5, 7, 8 rendered to plain text (`man/man1/ls.1`);
           README*, *.txt, *.md, *.rst and FAQ* under /usr/share/doc (`doc/gzip/README`) minus
           licences, changelogs, NEWS, history and author lists (boilerplate or version lists);
           the stdlib's pydoc topics, English reference text every CPython ships
           (`pydoc/topics/<name>`), so a machine without man pages still has prose.

A relpath never contains the machine's layout or the Python version, and a trailing `.gz` is
dropped, so `split_of(relpath)` (sha256 of the relpath, not the salted `hash`) puts a document in
the same split everywhere. Each source may be absent (recorded in the manifest); a domain that
ends up empty is an error.

On disk (`build_corpus`): JSONL shards `<domain>-<split>-<i>.jsonl` of {"domain", "relpath",
"split", "text"} in relpath order, and `manifest.json` (written last: a directory without it is an
unfinished build) with every document's bytes and sha256, totals, sources, skip counts and a corpus
hash. Nothing in it depends on time, so the same machine gives the same manifest.

Tokenizing and packing live beside this module (`dspark.data.tokenizer`, `dspark.data.pack`).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

DOMAINS = ("code", "prose")
SPLITS = ("train", "heldout")
MANIFEST = "manifest.json"

# Directory names never entered when collecting code: test suites are repetitive fixtures,
# pydoc_data/topics.py is the prose source below (as code it would leak prose across splits).
_SKIP_CODE_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages", "pydoc_data"})
# /usr/share/doc file stems that are boilerplate or version lists rather than prose.
_SKIP_DOC_STEMS = frozenset({"copyright", "changelog", "changes", "news", "history", "license", "licence",
                             "copying", "authors", "thanks"})
_DOC_SUFFIXES = (".txt", ".md", ".rst")
_SHARD_BYTES = 32 << 20
_OVERSTRIKE = re.compile(".\x08")
# CSI sequences (SGR colours, cursor moves) and OSC sequences (groff >= 1.23 emits OSC 8 links).
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")


@dataclass(frozen=True)
class Document:
    domain: str  # "code" | "prose"
    source: str  # "stdlib" | "site-packages" | "man" | "doc" | "pydoc"
    relpath: str
    text: str


@dataclass(frozen=True)
class CorpusSources:
    """Where each source lives on this machine and how to read it; None turns a source off."""

    # code
    stdlib: Path | None
    site_packages: Path | None  # read only with build_corpus(include_site_packages=True)
    # prose
    man: Path | None
    doc: Path | None
    pydoc_topics: bool = True
    man_sections: tuple[str, ...] = ("1", "5", "7", "8")
    man_timeout_s: float = 20.0
    # At most this many pages per command family (page name up to the first '-', '_' or '.'): one CLI
    # suite's generated reference pages (16k gcloud pages on one dev machine) would drown the rest.
    man_family_cap: int | None = 128

    @classmethod
    def default(cls) -> CorpusSources:
        """The running interpreter's stdlib and purelib, /usr/share/man and /usr/share/doc."""
        paths = sysconfig.get_paths()
        return cls(stdlib=Path(paths["stdlib"]), site_packages=Path(paths["purelib"]),
                   man=Path("/usr/share/man"), doc=Path("/usr/share/doc"))


@dataclass
class Manifest:
    documents: list[dict]  # per document: relpath, domain, source, split, bytes, sha256 (relpath order)
    totals: dict  # domain -> split -> {"documents", "bytes"}
    sources: dict  # source -> {"found", "root", "candidates", "reason" when absent}
    skipped: dict  # source -> reason -> count
    shards: list[dict]  # {"name", "domain", "split", "documents"}
    options: dict  # the build_corpus arguments that shape the corpus
    python: str
    corpus_sha256: str  # over the sorted (relpath, sha256) list

    @classmethod
    def load(cls, corpus_dir: str | Path) -> Manifest:
        path = Path(corpus_dir) / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"no corpus at {corpus_dir} (missing {MANIFEST}: never built or unfinished)")
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def save(self, corpus_dir: Path) -> None:
        tmp = corpus_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.__dict__, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, corpus_dir / MANIFEST)


# ------------------------------------------------------------------------------------- split
def _unit(tag: str, relpath: str) -> float:
    """A uniform number in [0, 1) from sha256, identical on every Python version and machine."""
    digest = hashlib.sha256(f"{tag}{relpath}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(relpath: str, heldout_fraction: float = 0.05) -> str:
    """"heldout" for a stable `heldout_fraction` of relpaths (by sha256 of the relpath), else "train"."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}")
    return "heldout" if _unit("", relpath) < heldout_fraction else "train"


def sample_key(relpath: str) -> float:
    """A second, independent hash of the relpath in [0, 1): the order in which candidates are sampled."""
    # Used for max_files, family caps and training byte caps; ordering by the split hash would put
    # every held-out document first.
    return _unit("sample:", relpath)


# --------------------------------------------------------------------------------- discovery
class _Skip(Exception):
    """A candidate that is not a document; the message is the reason counted in the manifest."""


@dataclass(frozen=True)
class _Candidate:
    domain: str
    source: str
    relpath: str
    load: Callable[[], str]  # the text, or raises _Skip


def _count(counts: dict, reason: str, n: int = 1) -> None:
    counts[reason] = counts.get(reason, 0) + n


def _decode(data: bytes) -> str:
    if b"\x00" in data:
        raise _Skip("binary")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Skip("not_utf8") from None
    if not text.strip():
        raise _Skip("empty")
    return text


def _read_file(path: Path) -> str:
    data = path.read_bytes()
    return _decode(gzip.decompress(data) if path.suffix == ".gz" else data)


def _walk(root: Path, skip_dirs: frozenset[str] = frozenset()) -> Iterator[tuple[Path, str]]:
    """(path, posix path relative to root) of regular files, sorted; symlinks are not followed."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            yield path, path.relative_to(root).as_posix()


def _code_candidates(root: Path, source: str, skipped: dict) -> list[_Candidate]:
    out = []
    for path, rel in _walk(root, _SKIP_CODE_DIRS):
        if path.suffix != ".py":
            continue
        if path.is_symlink():
            _count(skipped, "symlink")
        elif path.name.startswith("_sysconfigdata_"):  # this build's compiler flags and paths
            _count(skipped, "build_data")
        else:
            out.append(_Candidate("code", source, f"{source}/{rel}", lambda p=path: _read_file(p)))
    return out


def _clean_man(text: str) -> str:
    return _ANSI.sub("", _OVERSTRIKE.sub("", text))


def _render_man(path: Path, timeout_s: float) -> str:
    with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as fh:
        head = fh.read(4)
    if head.startswith(b".so "):  # a one-line redirect to another page, which is collected itself
        raise _Skip("redirect")
    # A fixed, minimal environment: 80 columns, UTF-8, no kept formatting, no user config.
    # -rHY=0 turns hyphenation off so words are not split across lines.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "MANWIDTH": "80", "LC_ALL": "C.UTF-8",
           "LANG": "C.UTF-8", "MANROFFOPT": "-rHY=0"}
    try:
        run = subprocess.run(["man", "-l", "-P", "cat", str(path)], env=env, capture_output=True,
                             timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise _Skip("render_timeout") from None
    if run.returncode != 0:
        raise _Skip("render_failed")
    text = _clean_man(_decode(run.stdout))
    if not text.strip():
        raise _Skip("empty")
    return text


def _man_candidates(src: CorpusSources, skipped: dict) -> list[_Candidate]:
    families: dict[str, list[_Candidate]] = {}
    for section in src.man_sections:
        folder = src.man / f"man{section}"
        if not folder.is_dir():
            continue
        for path, rel in _walk(folder):
            if path.is_symlink():  # another name for a page collected under its own name
                _count(skipped, "symlink")
                continue
            rel = rel.removesuffix(".gz")
            cand = _Candidate("prose", "man", f"man/man{section}/{rel}",
                              lambda p=path: _render_man(p, src.man_timeout_s))
            families.setdefault(re.split(r"[-_.]", Path(rel).name, maxsplit=1)[0], []).append(cand)
    out = []
    for members in families.values():
        members.sort(key=lambda c: sample_key(c.relpath))
        cap = len(members) if src.man_family_cap is None else src.man_family_cap
        out += members[:cap]
        if len(members) > cap:
            _count(skipped, "family_cap", len(members) - cap)
    return out


def _is_doc(name: str) -> bool:
    name = name.removesuffix(".gz")
    stem = name.split(".", 1)[0].lower()
    if stem in _SKIP_DOC_STEMS or stem.startswith("changelog"):
        return False
    return stem.startswith("readme") or stem.startswith("faq") or name.lower().endswith(_DOC_SUFFIXES)


def _doc_candidates(root: Path, skipped: dict) -> list[_Candidate]:
    out = []
    for path, rel in _walk(root):
        if not _is_doc(path.name):
            continue
        if path.is_symlink():
            _count(skipped, "symlink")
        else:
            out.append(_Candidate("prose", "doc", f"doc/{rel.removesuffix('.gz')}", lambda p=path: _read_file(p)))
    return out


def _pydoc_candidates() -> list[_Candidate]:
    from pydoc_data.topics import topics  # may be missing from stripped-down Pythons: caller records it

    return [_Candidate("prose", "pydoc", f"pydoc/topics/{name}", lambda t=text: _decode(t.encode("utf-8")))
            for name, text in sorted(topics.items())]


def _discover(src: CorpusSources, domains: tuple[str, ...], include_site_packages: bool,
              sources: dict, skipped: dict) -> list[_Candidate]:
    """Every candidate of the wanted domains; fills `sources` (found / absent) and discovery skips."""
    # (domain, source, root or None when off, finder); pydoc has no root: it is imported.
    wanted = [
        ("code", "stdlib", src.stdlib, lambda s: _code_candidates(src.stdlib, "stdlib", s)),
        ("code", "site-packages", src.site_packages if include_site_packages else None,
         lambda s: _code_candidates(src.site_packages, "site-packages", s)),
        ("prose", "man", src.man, lambda s: _man_candidates(src, s)),
        ("prose", "doc", src.doc, lambda s: _doc_candidates(src.doc, s)),
        ("prose", "pydoc", "pydoc_data.topics" if src.pydoc_topics else None, lambda s: _pydoc_candidates()),
    ]
    out = []
    for domain, name, root, find in wanted:
        if domain not in domains:
            continue
        status = {"found": False, "root": None if root is None else str(root), "candidates": 0}
        sources[name] = status
        if root is None:
            status["reason"] = "turned off"
        elif isinstance(root, Path) and not root.is_dir():
            status["reason"] = "no such directory"
        elif name == "man" and shutil.which("man") is None:
            status["reason"] = "no `man` program"
        else:
            try:
                found = find(skipped.setdefault(name, {}))
            except ImportError as e:
                status["reason"] = f"not importable ({e})"
                continue
            status.update(found=bool(found), candidates=len(found))
            if not found:
                status["reason"] = "no matching files"
            out += found
    return out


# ------------------------------------------------------------------------------------- build
def _select(cands: list[_Candidate], max_files: int | None, heldout_fraction: float, max_bytes: int,
            seen: set[str], skipped: dict, bar) -> list[Document]:
    """Load one domain's candidates in sample order until the per-split quotas are met.

    Train is loaded before held-out so a text found twice (one README shipped by two packages)
    stays in train and never leaks into held-out.
    """
    cands = sorted(cands, key=lambda c: sample_key(c.relpath))
    by_split = {s: [c for c in cands if split_of(c.relpath, heldout_fraction) == s] for s in SPLITS}
    if max_files is None:
        quota = {s: len(by_split[s]) for s in SPLITS}
    else:
        # Both splits get documents even in a tiny smoke corpus: held-out loss needs some.
        held = min(max_files - 1, max(1, round(max_files * heldout_fraction))) if heldout_fraction > 0 else 0
        quota = {"train": max_files - held, "heldout": held}
    docs = []
    for split in SPLITS:
        kept = 0
        for cand in by_split[split]:
            if kept == quota[split]:
                break
            bar.update(1)
            try:
                text = cand.load()
            except _Skip as skip:
                reason = str(skip)
            except (OSError, EOFError):  # EOFError: a truncated .gz
                reason = "unreadable"
            else:
                encoded = text.encode("utf-8")
                if len(encoded) > max_bytes:  # cut at a character boundary
                    text = encoded[:max_bytes].decode("utf-8", "ignore")
                    _count(skipped[cand.source], "truncated (kept)")
                digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
                if digest not in seen:
                    seen.add(digest)
                    docs.append(Document(cand.domain, cand.source, cand.relpath, text))
                    kept += 1
                    continue
                reason = "duplicate"
            _count(skipped[cand.source], reason)
    return docs


def _write_shards(out_dir: Path, domain: str, split: str, docs: list[Document]) -> list[dict]:
    """JSONL shards of about `_SHARD_BYTES` each; returns their {"name", "domain", "split", "documents"}."""
    shards: list[dict] = []
    fh, size = None, 0
    try:
        for doc in docs:
            if fh is None or size >= _SHARD_BYTES:
                if fh is not None:
                    fh.close()
                shards.append({"name": f"{domain}-{split}-{len(shards):05d}.jsonl", "domain": domain,
                               "split": split, "documents": 0})
                fh, size = open(out_dir / shards[-1]["name"], "w", encoding="utf-8"), 0
            line = json.dumps({"domain": domain, "relpath": doc.relpath, "split": split, "text": doc.text},
                              ensure_ascii=False) + "\n"
            fh.write(line)
            size += len(line)
            shards[-1]["documents"] += 1
    finally:
        if fh is not None:
            fh.close()
    return shards


def build_corpus(out_dir: str | Path, *, domains: Iterable[str] = DOMAINS, max_files: int | None = None,
                 max_bytes: int = 1 << 20, heldout_fraction: float = 0.05, include_site_packages: bool = False,
                 sources: CorpusSources | None = None, progress: bool = True) -> Manifest:
    """Collect, split and write the corpus to `out_dir`; returns (and writes) its manifest.

    `max_files` caps documents per domain, sampled by a hash of the relpath (both splits keep at
    least one); `max_bytes` truncates each document. Old shards in `out_dir` are replaced.
    """
    domains = tuple(domains)
    bad = [d for d in domains if d not in DOMAINS]
    if bad or not domains:
        raise ValueError(f"domains must be a non-empty subset of {DOMAINS}, got {domains!r}")
    if max_files is not None and max_files < 2:
        raise ValueError(f"max_files must be >= 2 (one train and one held-out document), got {max_files}")
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    split_of("", heldout_fraction)  # validates the fraction
    src = sources or CorpusSources.default()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    found, skipped = {}, {}
    cands = _discover(src, domains, include_site_packages, found, skipped)
    docs: list[Document] = []
    seen: set[str] = set()
    for domain in domains:
        mine = [c for c in cands if c.domain == domain]
        total = len(mine) if max_files is None else min(len(mine), max_files)
        with _bar(total, f"corpus {domain}", progress) as bar:
            got = _select(mine, max_files, heldout_fraction, max_bytes, seen, skipped, bar)
        if not got:
            where = {name: s.get("reason", f"{s['candidates']} candidates, all skipped") for name, s in found.items()}
            raise RuntimeError(f"no {domain} documents found on this machine; sources: {where}; skipped: {skipped}")
        docs += got
    docs.sort(key=lambda d: d.relpath)

    (out_dir / MANIFEST).unlink(missing_ok=True)  # the directory is unfinished until the new one lands
    for old in out_dir.glob("*.jsonl"):
        old.unlink()
    rows, shards, totals = [], [], {d: {s: {"documents": 0, "bytes": 0} for s in SPLITS} for d in domains}
    for domain in domains:
        for split in SPLITS:
            group = [d for d in docs if d.domain == domain and split_of(d.relpath, heldout_fraction) == split]
            shards += _write_shards(out_dir, domain, split, group)
            for doc in group:
                encoded = doc.text.encode("utf-8")
                rows.append({"relpath": doc.relpath, "domain": domain, "source": doc.source, "split": split,
                             "bytes": len(encoded), "sha256": hashlib.sha256(encoded).hexdigest()})
                totals[domain][split]["documents"] += 1
                totals[domain][split]["bytes"] += len(encoded)
    rows.sort(key=lambda r: r["relpath"])

    listing = "".join(f"{r['relpath']}\t{r['sha256']}\n" for r in rows)
    manifest = Manifest(
        documents=rows, totals=totals, sources=found, skipped={k: v for k, v in skipped.items() if v},
        shards=shards,
        options={"domains": list(domains), "max_files": max_files, "max_bytes": max_bytes,
                 "heldout_fraction": heldout_fraction, "include_site_packages": include_site_packages,
                 "man_sections": list(src.man_sections), "man_family_cap": src.man_family_cap},
        python=platform.python_version(), corpus_sha256=hashlib.sha256(listing.encode("utf-8")).hexdigest())
    manifest.save(out_dir)
    return manifest


def read_corpus(corpus_dir: str | Path, split: str, domain: str | None = None) -> Iterator[Document]:
    """The documents of one split (optionally one domain) of a built corpus, in relpath order per shard."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if domain is not None and domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS} or None, got {domain!r}")
    corpus_dir = Path(corpus_dir)
    manifest = Manifest.load(corpus_dir)
    sources = {row["relpath"]: row["source"] for row in manifest.documents}
    for shard in manifest.shards:
        if shard["split"] != split or domain not in (None, shard["domain"]):
            continue
        with open(corpus_dir / shard["name"], encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                yield Document(row["domain"], sources[row["relpath"]], row["relpath"], row["text"])


# ------------------------------------------------------------------------------------ progress
class _bar:
    """A tqdm bar when available and wanted, else nothing."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.tqdm = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.tqdm = tqdm(total=total, desc=desc, unit="file")
            except ImportError:
                pass

    def update(self, n: int) -> None:
        if self.tqdm is not None:
            self.tqdm.update(n)

    def __enter__(self) -> _bar:
        return self

    def __exit__(self, *exc) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
