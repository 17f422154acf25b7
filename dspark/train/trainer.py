"""The training loop: AdamW with warmup + cosine, clipping, checkpoints with exact resume.

`Trainer` owns the loop; a subclass says what one step computes (`compute`) and what happens after
the optimizer step (`after_step`). Each step draws its data as a pure function of (seed, step), so
the only state is the step, the weights (buffers included) and the optimizer: a run stopped at any
checkpoint and resumed ends with the same weights as an uninterrupted one. Every step appends one
JSON line to `loss.jsonl`; a resumed run first drops lines past its checkpoint. Models are saved and
restored through `dspark.checkpoint` (`save`, `load_weights`).

`DraftTrainer` trains a draft (embedding and LM head frozen: copies of the target's).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import torch

from dspark import checkpoint
from dspark.config import TrainConfig
from dspark.train.data import step_generator
from dspark.train.loss import LossConfig, aligned_target_logits, dspark_loss, sample_anchors

FROZEN = ("embed_tokens.weight", "lm_head.weight")  # copies of the target's (the V4 layout holds none)


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Trainer:
    def __init__(self, model, config: TrainConfig, out_dir: str | Path, frozen: tuple[str, ...] = ()):
        self.model, self.config = model, config
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=config.betas, eps=config.eps,
                                           weight_decay=config.weight_decay)
        self.step = 0

    def compute(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of step `step` (differentiable) and the values to log."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (e.g. non-gradient updates of buffers)."""

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        loss, extra = self.compute(step)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.after_step(step)
        return {"step": step, "loss": float(loss.detach()), "lr": cfg.lr_at(step), "grad_norm": float(grad_norm),
                **extra}

    # ---------------------------------------------------------------- the loop
    def train(self, *, resume: bool = True, progress: bool = True, stop_after: int | None = None) -> dict:
        """Train to `config.steps` (or stop early after `stop_after` steps of this call, e.g. in tests);
        resumes from `out_dir/checkpoint` when present."""
        if resume and (self.out / "checkpoint").exists():
            self.load_checkpoint()
        log = self.out / "loss.jsonl"
        self._truncate_log(log)
        bar = _progress(self.config.steps, self.step, progress)
        last = {}
        with log.open("a") as f:
            done = 0
            while self.step < self.config.steps and (stop_after is None or done < stop_after):
                last = self.train_step(self.step)
                self.step += 1
                done += 1
                if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                    f.write(json.dumps(last) + "\n")
                    f.flush()
                if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                    self.save_checkpoint()
                bar.update(last)
        bar.close()
        return last

    def _truncate_log(self, log: Path) -> None:
        if not log.exists():
            return
        lines = [ln for ln in log.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] < self.step]
        log.write_text("".join(ln + "\n" for ln in lines))

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Atomically replace `out_dir/checkpoint` (weights as safetensors, optimizer, step)."""
        tmp = self.out / "checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        checkpoint.save(self.model, tmp / "model")
        torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": self.step, "weights_sha256": weights_hash(self.model),
                                                      "saved": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        final = self.out / "checkpoint"
        old = self.out / "checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self) -> None:
        path = self.out / "checkpoint"
        meta = json.loads((path / "trainer.json").read_text())
        checkpoint.load_weights(self.model, path / "model")
        # The optimizer state is plain tensors and numbers: weights_only refuses anything else.
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.step = int(meta["step"])
        if weights_hash(self.model) != meta["weights_sha256"]:
            raise ValueError(f"checkpoint {path} is corrupt: weights hash does not match trainer.json")


class DraftTrainer(Trainer):
    """DSpark / DFlash draft training on the target's features (dspark.md §4)."""

    def __init__(self, draft, data, config: TrainConfig, loss: LossConfig, out_dir: str | Path):
        super().__init__(draft, config, out_dir, frozen=FROZEN)
        self.draft, self.data, self.loss_config = draft, data, loss

    def compute(self, step: int):
        cfg = self.config
        batch = self.data.batch(step)
        gen = step_generator(cfg.seed, step, "anchors")
        anchors, keep = zip(*(sample_anchors(m, cfg.num_anchors, gen) for m in batch.loss_mask))
        anchors, keep = torch.stack(anchors), torch.stack(keep)
        out = self.draft.forward_train(batch.input_ids, batch.features, anchors, keep)
        target_logits = aligned_target_logits(self.draft.base_logits, batch.last_hidden, anchors, keep,
                                              self.draft.block_size)
        loss = dspark_loss(out, target_logits, batch.loss_mask, anchors, keep, self.loss_config)
        metrics = {name: float(m.num / m.den) for name, m in loss.metrics.items() if float(m.den) > 0}
        return loss.loss, metrics


class _progress:
    """A tqdm bar when available and wanted, else nothing."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=start, desc="train", unit="step")
            except ImportError:
                pass

    def update(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
