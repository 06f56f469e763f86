"""Answer extraction, mathematical equivalence, Pass@k, and the benchmark report."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from eopd_ray.evaluation.math_answers import (
    BenchmarkError,
    Problem,
    extract_boxed,
    is_equivalent,
    load_benchmark,
    pass_at_k,
    report,
    score_benchmark,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"first \boxed{1} then \boxed{2}", "2"),  # the last one
        (r"\boxed{\left\{1, 2\right\}}", r"\left\{1, 2\right\}"),
        (r"nested \boxed{a^{b^{c}}} end", "a^{b^{c}}"),
        (r"$\boxed 5$", "5"),
        (r"\fbox{7}", "7"),
        (r"\boxed{3} and later \fbox{4}", "4"),
        (r"no box here", None),
        (r"cut off \boxed{\frac{1}{", None),
        (r"\boxed", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"),
    (r"\frac12", r"\frac{1}{2}"),
    ("1/2", r"\dfrac{1}{2}"),
    ("2/4", "0.5"),
    ("0.25", r"\frac{1}{4}"),
    ("3.0", "3"),
    ("50\\%", "0.5"),
    ("50\\%", "50"),
    ("90^\\circ", "90"),
    (r"\sqrt{8}", r"2\sqrt{2}"),
    ("x^2+2x+1", "(x+1)^2"),
    (r"(1, 2]", r"(1,2]"),
    (r"\{1, 2, 3\}", r"\{3, 2, 1\}"),
    (r"\text{10}", "10"),
    (r"10 \text{ cm}", "10"),
    (r"\$5", "5"),
    (r"\pi", r"\pi"),
    ("-3", "-3"),
    ("1,000", "1000"),
]

NOT_EQUIVALENT = [
    ("3", "4"),
    (r"\frac{1}{3}", "0.5"),
    (r"(1, 2)", r"[1, 2]"),
    (r"\{1, 2\}", r"\{1, 3\}"),
    ("x+1", "x-1"),
    ("2", r"\sqrt{2}"),
    ("", "3"),
    (r"\frac{", "3"),
    ("}{)(", "1"),
    ("banana", "7"),
]


@pytest.mark.parametrize("prediction, reference", EQUIVALENT)
def test_equivalent_pairs(prediction, reference):
    assert is_equivalent(prediction, reference)


@pytest.mark.parametrize("prediction, reference", NOT_EQUIVALENT)
def test_non_equivalent_pairs(prediction, reference):
    assert not is_equivalent(prediction, reference)


def test_pass_at_k_matches_brute_force_over_subsets():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 9)
        c = rng.randint(0, n)
        k = rng.randint(1, n)
        flags = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(flags, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)


def test_score_and_report():
    problems = [Problem("a", "1+1?", "2"), Problem("b", "half?", r"\frac12")]
    completions = [[r"\boxed{2}", r"\boxed{3}"], [r"\boxed{0.5}", "no answer"]]
    score, records = score_benchmark("toy", problems, completions, k=2)
    assert score.avg_at_k == pytest.approx(50.0)
    assert score.pass_at_k == pytest.approx(100.0)
    assert records[1]["extracted"] == ["0.5", None] and records[1]["correct"] == [True, False]
    data, table = report([score, score])
    assert data["mean"]["pass@2"] == pytest.approx(100.0)
    assert "| toy | 50.00 | 100.00 |" in table and "| mean |" in table


def test_benchmark_file_errors_name_file_and_line(tmp_path):
    good = tmp_path / "b.jsonl"
    good.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    assert load_benchmark(good)[0].answer == "2"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n{oops\n")
    with pytest.raises(BenchmarkError, match="line 2"):
        load_benchmark(bad)
    bad.write_text(json.dumps({"problem": "1+1"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"line 1: missing or empty \['answer'\]"):
        load_benchmark(bad)
