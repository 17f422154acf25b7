"""Training-test helpers: sequences sampled from a target, DSpark decoding with a draft, and the
mean tokens per round (tau) of a batch of results."""

from __future__ import annotations

import torch

from dspark.decode import generate
from dspark.train.data import SequenceData


def sampled_sequences(target, n: int, length: int, seed: int) -> SequenceData:
    v = target.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, v, (4,), generator=g).tolist() for _ in range(n)]
    res = generate(target, prompts, max_new_tokens=length - 4, temperature=1.0, seed=seed, max_seq_len=length + 8,
                   max_batch=n)
    return SequenceData([torch.tensor(p + r.token_ids) for p, r in zip(prompts, res)], seq_len=64)


def decode(target, draft, prompts, temperature: float, new_tokens: int = 40, **kw):
    return generate(target, prompts, method="dspark", draft=draft.eval(), max_new_tokens=new_tokens, max_seq_len=128,
                    max_batch=len(prompts), temperature=temperature, seed=3, **kw)


def tau(results) -> float:
    return sum(sum(r.stats.emitted) for r in results) / sum(r.stats.rounds for r in results)
