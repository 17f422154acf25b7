"""Training data for drafts: token sequences and the target's view of them (dspark.md §4.1).

Per training sequence the draft needs the target's tapped-layer features [S, F] (for V4: the
stream mean of each tapped layer's output, concatenated) and its final-normed hidden state [S, D]
(the LM-head input: target logits are recomputed from it only where a slot needs them). Both come
from one dense target forward, computed on the fly or cached to disk in safetensors shards.

Batches are a pure function of (seed, step): a resumed run draws exactly what an uninterrupted
one would.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, S]
    loss_mask: torch.Tensor  # [B, S] fp32
    features: torch.Tensor  # [B, S, F]
    last_hidden: torch.Tensor  # [B, S, D]


def step_generator(seed: int, step: int, stream: str = "") -> torch.Generator:
    """An independent generator for (seed, step, stream): no state to checkpoint."""
    digest = hashlib.sha256(f"{seed}:{step}:{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


@torch.no_grad()
def target_features(target, input_ids: torch.Tensor, tap_layers: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense target forward over [B, S] ids → (features [B, S, taps·D], final-normed hidden [B, S, D])."""
    out = target.run(input_ids, tap_layers=tuple(tap_layers))
    features = torch.cat([out.taps[layer] for layer in tap_layers], dim=-1)
    return features.float(), target.model.norm(target.model.hc_head(out.streams)).float()


class SequenceData:
    """Token sequences (each with a loss mask) cut into windows of `seq_len` tokens per step."""

    def __init__(self, sequences: list[torch.Tensor], seq_len: int, loss_masks: list[torch.Tensor] | None = None):
        if not sequences:
            raise ValueError("no training sequences")
        short = [len(s) for s in sequences if len(s) < seq_len]
        if short:
            raise ValueError(f"{len(short)} sequences are shorter than seq_len {seq_len} (e.g. {short[0]} tokens)")
        self.sequences = [s.long() for s in sequences]
        self.masks = [m.float() for m in loss_masks] if loss_masks else [torch.ones(len(s)) for s in sequences]
        self.seq_len = seq_len

    def windows(self, gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(0, len(self.sequences), (batch_size,), generator=gen).tolist()
        ids, masks = [], []
        for i in pick:
            start = int(torch.randint(0, len(self.sequences[i]) - self.seq_len + 1, (1,), generator=gen))
            ids.append(self.sequences[i][start:start + self.seq_len])
            masks.append(self.masks[i][start:start + self.seq_len])
        return torch.stack(ids), torch.stack(masks)


class OnTheFly:
    """Batches whose target view is computed when drawn."""

    def __init__(self, target, data: SequenceData, tap_layers: tuple[int, ...], batch_size: int, seed: int):
        self.target, self.data, self.taps = target, data, tuple(tap_layers)
        self.batch_size, self.seed = batch_size, seed

    def batch(self, step: int) -> Batch:
        ids, mask = self.data.windows(step_generator(self.seed, step, "batch"), self.batch_size)
        features, hidden = target_features(self.target, ids, self.taps)
        return Batch(ids, mask, features, hidden)


class FeatureShards:
    """The target view of a fixed set of windows, cached in safetensors shards with a manifest.

    `write` runs the target once per window; `batch(step)` then samples cached windows, so draft
    training never touches the target again.
    """

    def __init__(self, path: str | Path, batch_size: int, seed: int):
        self.path, self.batch_size, self.seed = Path(path), batch_size, seed
        manifest = self.path / "manifest.json"
        if not manifest.exists():
            raise FileNotFoundError(f"no feature cache at {self.path} (missing manifest.json)")
        self.manifest = json.loads(manifest.read_text())
        self.shards = [load_file(str(self.path / name)) for name in self.manifest["shards"]]
        self.index = [(s, row) for s, shard in enumerate(self.shards) for row in range(shard["input_ids"].shape[0])]

    @staticmethod
    def write(path: str | Path, target, data: SequenceData, tap_layers: tuple[int, ...], windows: int,
              seed: int, shard_size: int = 256, progress=None) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        gen = step_generator(seed, 0, "cache")
        names = []
        for start in range(0, windows, shard_size):
            n = min(shard_size, windows - start)
            ids, mask = data.windows(gen, n)
            features, hidden = target_features(target, ids, tap_layers)
            name = f"features-{len(names):05d}.safetensors"
            save_file({"input_ids": ids, "loss_mask": mask, "features": features, "last_hidden": hidden},
                      str(path / name))
            names.append(name)
            if progress is not None:
                progress(n)
        (path / "manifest.json").write_text(json.dumps({"shards": names, "windows": windows,
                                                        "tap_layers": list(tap_layers), "seq_len": data.seq_len}))
        return path

    def batch(self, step: int) -> Batch:
        gen = step_generator(self.seed, step, "batch")
        pick = torch.randint(0, len(self.index), (self.batch_size,), generator=gen).tolist()
        rows = [self.index[i] for i in pick]

        def stack(key):
            return torch.stack([self.shards[s][key][r] for s, r in rows])

        return Batch(stack("input_ids"), stack("loss_mask"), stack("features"), stack("last_hidden"))
