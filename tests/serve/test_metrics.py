"""Prometheus text: histograms are cumulative with +Inf = count, speculative figures per round and per
position, and `parse` reads back what `render` wrote."""

from __future__ import annotations

import pytest

from dspark.decode.stats import RequestStats
from dspark.serve.metrics import Histogram, Metrics, parse


def test_histogram_is_cumulative():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    lines = h.lines("x")
    assert lines == ['x_bucket{le="0.1"} 2', 'x_bucket{le="1.0"} 3', 'x_bucket{le="+Inf"} 4', "x_sum 3.65",
                     "x_count 4"]


def test_rounds_positions_and_tau():
    m = Metrics("tiny", "mtp")
    stats = RequestStats()
    stats.record(3, 2, 3)
    stats.record(2, 0, 1)
    m.observe_rounds(stats, 0)
    stats.record(1, 1, 2)
    m.observe_rounds(stats, 2)  # only the round that is new
    m.observe_tokens(5, ttft=0.2, itl=None)
    m.observe_tokens(1, ttft=None, itl=0.01)
    m.observe_finished("length", 1.0)
    values = parse(m.render(running=1, waiting=2, free_pages=7, total_pages=9))
    lab = 'model_name="tiny",method="mtp"'
    assert values[f"dspark:spec_decode_num_drafts{{{lab}}}"] == 3
    assert values[f"dspark:spec_decode_num_draft_tokens{{{lab}}}"] == 6
    assert values[f"dspark:spec_decode_num_accepted_tokens{{{lab}}}"] == 3
    assert values[f"dspark:spec_decode_mean_tau{{{lab}}}"] == pytest.approx(2.0)
    per_pos = [values[f'dspark:spec_decode_num_accepted_tokens_per_pos{{{lab},position="{i}"}}'] for i in range(3)]
    proposed = [values[f'dspark:spec_decode_num_proposed_tokens_per_pos{{{lab},position="{i}"}}'] for i in range(3)]
    assert per_pos == [2, 1, 0] and proposed == [3, 2, 1]
    assert values[f'dspark:spec_decode_verify_tokens_per_round_bucket{{le="4.0",{lab}}}'] == 3
    assert values[f"dspark:generation_tokens_total{{{lab}}}"] == 6
    assert values[f"dspark:time_to_first_token_seconds_count{{{lab}}}"] == 1
    assert values[f"dspark:inter_token_latency_seconds_count{{{lab}}}"] == 1
    assert values[f'dspark:request_success_total{{{lab},finished_reason="length"}}'] == 1
    assert values[f"dspark:num_requests_waiting{{{lab}}}"] == 2
