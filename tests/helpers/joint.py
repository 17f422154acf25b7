"""The end-to-end distribution tests' tools: the exact joint of a tiny model's first new tokens and a
G-test of sampled counts against it, and the sampled counts themselves. Any target whose call `model(ids [B, T])` gives logits [B, T, V] serves
(DeepseekV4, DenseTarget)."""

from __future__ import annotations

import math

import torch

from dspark import ops


def g_test(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of a G-test of `counts` against `probs`, pooling cells expected below 5."""
    n = counts.sum()
    expected = probs.flatten() * n
    counts = counts.flatten().double()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    assert float(obs[exp == 0].sum()) == 0 if (exp == 0).any() else True
    g = 2 * float(torch.where(obs > 0, obs * torch.log(obs / exp), torch.zeros_like(obs)).sum())
    dof = int(keep.sum()) - 1
    return _chi2_sf(g, dof)


def _chi2_sf(x: float, k: int) -> float:
    """Survival function of the chi-square distribution (regularised upper incomplete gamma)."""
    a, z = k / 2.0, x / 2.0
    if z < a + 1:  # series for the lower part
        term = total = 1.0 / a
        for n in range(1, 10000):
            term *= z / (a + n)
            total += term
            if term < total * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(-z + a * math.log(z) - math.lgamma(a)))
    # continued fraction for the upper part
    b, c, d = z + 1 - a, 1e300, 1.0 / (z + 1 - a)
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1.0 / d if abs(d) > 1e-300 else 1e300
        c = b + an / c if abs(c) > 1e-300 else 1e300
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h * math.exp(-z + a * math.log(z) - math.lgamma(a))


def exact_joint(model, prompt: list[int], sampling: dict) -> torch.Tensor:
    """P(t1..t4) [V, V, V, V] of the first 4 new tokens under `sampling` (temperature, top_k, top_p),
    from one dense forward of `model` over every 3-token continuation of `prompt`."""
    v, new = model.config.vocab_size, 4
    conts = torch.cartesian_prod(*[torch.arange(v)] * (new - 1))  # [V³, 3]
    ids = torch.cat([torch.tensor(prompt).expand(conts.shape[0], -1), conts], dim=1)
    with torch.no_grad():
        logits = model(ids)[:, len(prompt) - 1:]  # [V³, 4, V]
    n = logits.shape[0] * new
    p = ops.probs(logits.reshape(n, v), torch.full((n,), sampling["temperature"]),
                  torch.full((n,), sampling.get("top_k", 0)), torch.full((n,), sampling.get("top_p", 1.0)))
    p = p.double().view(v, v, v, new, v)  # [t1, t2, t3, step, next]
    p1, p2, p3, p4 = p[0, 0, 0, 0], p[:, 0, 0, 1], p[:, :, 0, 2], p[:, :, :, 3]  # p(t_i | t_<i)
    return p1[:, None, None, None] * p2[:, :, None, None] * p3[:, :, :, None] * p4


def sample_joint_counts(target, prompt: list[int], new_tokens: int, samples: int, batch: int,
                        **generate_kwargs) -> tuple[torch.Tensor, int]:
    """Counts [V] * new_tokens of the first `new_tokens` tokens of `samples` requests on `prompt` (request j
    seeded 1_000_003·j + 17, `batch` at a time through `dspark.decode.generate` with `generate_kwargs`: method,
    draft, sampling filters), and the number of drafts accepted over all of them."""
    from dspark.decode import generate

    v = target.config.vocab_size
    counts, accepted, done = torch.zeros([v] * new_tokens, dtype=torch.long), 0, 0
    while done < samples:
        n = min(batch, samples - done)
        res = generate(target, [prompt] * n, max_new_tokens=new_tokens, max_seq_len=64, max_batch=n,
                       prefill_chunk=n * len(prompt), seed=[1_000_003 * (done + i) + 17 for i in range(n)],
                       **generate_kwargs)
        for r in res:
            counts[tuple(r.token_ids)] += 1
            accepted += sum(r.stats.accepted)
        done += n
    return counts, accepted
