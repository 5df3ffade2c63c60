"""Metrics helpers on their own (route and method labels are tested through the app in test_app)."""

from __future__ import annotations

from deltatune.serve.metrics import percentiles


def test_percentiles_are_nearest_rank():
    assert percentiles([5, 1, 4, 2, 3]) == {"p50": 3, "p90": 5, "p99": 5}
    assert percentiles(range(1, 17)) == {"p50": 8, "p90": 15, "p99": 16}
    assert percentiles(range(1, 101)) == {"p50": 50, "p90": 90, "p99": 99}
    assert percentiles([7.5]) == {"p50": 7.5, "p90": 7.5, "p99": 7.5}
    assert percentiles([]) == {}
