"""How numbers, durations and name lists read in logs, reports and error lines."""

from __future__ import annotations

import pytest

from oqat.utils.fmt import few, fmt_s, pct, si


@pytest.mark.parametrize("names, text", [
    ([], ""), (["a"], "a"), (["a", "b", "c"], "a, b, c"), (["a", "b", "c", "d", "e"], "a, b, c and 2 more"),
    ((f"t{i}" for i in range(4)), "t0, t1, t2 and 1 more"),
])
def test_few_names_at_most_three_then_a_count(names, text):
    assert few(names) == text


def test_few_takes_another_limit():
    assert few(range(5), most=1) == "0 and 4 more"


@pytest.mark.parametrize("seconds, text", [(None, "–"), (12.34, "12.3 s"), (245, "4 min 05 s"), (3720, "1 h 02 min")])
def test_durations(seconds, text):
    assert fmt_s(seconds) == text


@pytest.mark.parametrize("value, text", [(None, "–"), (587, "587"), (0.25, "0.25"), (1234567, "1.23 M"), (4.56e5, "456 k")])
def test_si_three_significant_digits(value, text):
    assert si(value) == text


def test_pct_two_decimals():
    assert pct(87.6789) == "87.68" and pct(None) == "–"
