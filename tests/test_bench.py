"""The benchmark's arithmetic: speedups are per-turn ratios, and lossy output is counted, not hidden."""

import pytest

from ctcspec.bench.run import SystemRuns, TurnRecord
from ctcspec.bench.summary import per_category, summarize


class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def runs(name, records):
    r = SystemRuns(name)
    r.turns = [TurnRecord("q", cat, 0, toks, steps, secs) for cat, toks, steps, secs in records]
    return r


def test_speedup_is_the_mean_of_per_turn_ratios_and_differences_are_counted():
    vanilla = runs("vanilla", [("a", [1, 2, 3, 4], 4, 2.0), ("b", [5, 6], 2, 1.0)])
    drafted = runs("lookup", [("a", [1, 2, 3, 4], 2, 1.0), ("b", [5, 7], 1, 0.25)])
    report = summarize({"vanilla": vanilla, "lookup": drafted}, FakeTokenizer())
    row = report["systems"]["lookup"]
    assert row["beta"] == pytest.approx(6 / 3)
    assert row["speedup_vs_vanilla"] == pytest.approx((2.0 + 4.0) / 2)
    assert row["median_speedup_vs_vanilla"] == pytest.approx(3.0)
    assert row["outputs_differing_from_vanilla"] == 1
    assert report["systems"]["vanilla"]["outputs_differing_from_vanilla"] == 0
    cats = per_category(report)
    assert cats["lookup"]["a"] == pytest.approx({"beta": 2.0, "speedup_vs_vanilla": 2.0})
    assert cats["lookup"]["b"]["speedup_vs_vanilla"] == pytest.approx(4.0)
