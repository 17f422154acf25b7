"""The op surface used by `dspark.model` and `dspark.decode`.

Each op module holds its plain-PyTorch reference (`<op>_ref`, the specification) and the name the
rest of the package calls. Ops with Triton kernels take `kernels="auto" | "triton" | "ref"` (auto: the
kernel when every input is on CUDA and Triton imports) and are registered as `dspark::<op>`. Modules
pass their config's `kernels` field (`ModelConfig.kernels`, `DraftConfig.kernels`) as `kernels`.
"""

from dspark.ops.attention import sink_attention, sink_attention_ref, sparse_sink_attention, sparse_sink_attention_ref
from dspark.ops.compressor import compress_windows, compress_windows_ref
from dspark.ops.indexer import (indexer_scores, indexer_scores_ref, indexer_select, indexer_select_ref, indexer_topk,
                                indexer_topk_ref)
from dspark.ops.markov import markov_logits, markov_logits_ref, markov_sample, markov_sample_ref
from dspark.ops.mhc import (hc_collapse, hc_collapse_ref, hc_expand, hc_expand_ref, hc_head, hc_head_ref, hc_weights,
                            hc_weights_collapse, hc_weights_collapse_ref, hc_weights_ref)
from dspark.ops.paged_attention import paged_attention, paged_attention_ref
from dspark.ops.rejection import chain_rejection, chain_rejection_ref
from dspark.ops.quant_gemm import fp4_experts, fp4_experts_ref, fp8_linear, fp8_linear_ref
from dspark.ops.rng import uniforms
from dspark.ops.sampling import probs, probs_ref, sample, sample_logits, sample_logits_ref, sample_ref
from dspark.ops.moe import (experts, experts_dense, experts_ref, experts_sorted, hash_route, hash_route_ref,
                            score_route, score_route_ref, swiglu_ref)
from dspark.ops._select import topk_lowest_index

__all__ = [
    "sink_attention", "sink_attention_ref", "sparse_sink_attention", "sparse_sink_attention_ref",
    "compress_windows", "compress_windows_ref",
    "paged_attention", "paged_attention_ref",
    "indexer_scores", "indexer_scores_ref", "indexer_select", "indexer_select_ref", "indexer_topk", "indexer_topk_ref",
    "markov_logits", "markov_logits_ref", "markov_sample", "markov_sample_ref",
    "hc_collapse", "hc_collapse_ref", "hc_expand", "hc_expand_ref", "hc_head", "hc_head_ref", "hc_weights",
    "hc_weights_collapse", "hc_weights_collapse_ref", "hc_weights_ref",
    "fp4_experts", "fp4_experts_ref", "fp8_linear", "fp8_linear_ref",
    "chain_rejection", "chain_rejection_ref", "uniforms", "probs", "probs_ref", "sample", "sample_ref",
    "sample_logits", "sample_logits_ref",
    "experts", "experts_dense", "experts_ref", "experts_sorted", "hash_route", "hash_route_ref", "score_route",
    "score_route_ref", "swiglu_ref",
    "topk_lowest_index",
]
