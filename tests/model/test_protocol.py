"""DeepseekV4 is a Target: the surface the engine and drafters use, and a cache from `new_cache`
that the ragged forward fills to the dense forward's logits."""

from __future__ import annotations

import torch

from dspark.config import ModelConfig
from dspark.model import DeepseekV4, Target
from dspark.model.batch import Batch
from dspark.model.cache import TargetCache


def test_deepseek_v4_is_a_target_and_its_cache_serves_the_ragged_forward():
    model = DeepseekV4.random(ModelConfig.tiny(), seed=0).eval()
    assert isinstance(model, Target)
    cache = model.new_cache(max_batch=2, max_seq_len=48, max_provisional=4)
    assert isinstance(cache, TargetCache) and cache.max_batch == 2 and not cache.mtp
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist() for n in (21, 9))
    for slot in range(2):
        cache.admit(slot, 48)
    with torch.no_grad():
        out = model.forward_batch(Batch.build([(0, 0, a), (1, 0, b)], dummy_slot=cache.dummy_slot, logits="all"),
                                  cache)
        want = torch.cat([model(torch.tensor([a]))[0], model(torch.tensor([b]))[0]])
    torch.testing.assert_close(out.logits, want, rtol=1e-4, atol=1e-4)
