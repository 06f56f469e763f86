"""The question bank: well-formed questions, answers the judge accepts, a split by fact."""

from __future__ import annotations

from collections import Counter

import pytest

from eopd_ray.evaluation.question_bank import (
    number_answers,
    question_bank,
    split_by_fact,
)
from eopd_ray.evaluation.short_answer import is_correct, names


def test_bank_is_fixed_distinct_and_covers_every_family():
    bank = question_bank()
    assert bank == question_bank()
    assert len({q.prompt for q in bank}) == len(bank)
    assert len({(q.family, q.fact) for q in bank}) == len(bank)
    families = Counter(q.family for q in bank)
    expected = {"capital", "language", "opposite", "plural", "colour", "sum", "next", "count"}
    assert set(families) == expected | {"fact"}
    assert families["sum"] == 45  # 1 <= a <= b <= 9


def test_every_answer_is_judged_correct_and_no_rival_is_an_answer():
    for q in question_bank():
        for answer in q.answers:
            # As a bare answer and in a sentence restating the question.
            assert is_correct(q, answer), (q.prompt, answer)
            assert is_correct(q, f"{q.prompt.rstrip('?')}: {answer}."), (q.prompt, answer)
        assert not set(q.answers) & set(q.rivals), q.prompt


def test_a_wrong_answer_of_the_same_family_is_judged_wrong():
    bank = {q.prompt: q for q in question_bank()}
    egypt = bank["What is the capital of Egypt?"]
    assert not is_correct(egypt, "The capital of Egypt is Paris.")
    assert not is_correct(egypt, "Cairo. Or Paris.")  # hedging over rivals
    three_four = bank["What is 3 + 4?"]
    assert is_correct(three_four, "3 + 4 = 7")
    assert is_correct(three_four, "Three plus four is seven.")
    assert not is_correct(three_four, "3 + 4 = 8")
    snow = bank["What color is snow?"]
    assert not is_correct(snow, "Snow is white, sometimes blue.")


def test_number_answers_give_digits_and_words():
    assert number_answers(7) == ("7", "seven")
    assert number_answers(20) == ("20", "twenty")
    assert number_answers(365) == ("365",)


def test_sum_rivals_exclude_the_answer_and_reach_twenty():
    q = next(q for q in question_bank() if q.prompt == "What is 9 + 9?")
    assert q.answers == ("18", "eighteen")
    assert "17" in q.rivals and "nineteen" in q.rivals and "18" not in q.rivals


def test_split_by_fact_holds_out_whole_facts_per_family():
    bank = question_bank()
    train, held = split_by_fact(bank, 0.4, seed=0)
    assert len(train) + len(held) == len(bank)
    assert not {(q.family, q.fact) for q in train} & {(q.family, q.fact) for q in held}
    per_family = Counter(q.family for q in bank)
    held_family = Counter(q.family for q in held)
    for family, n in per_family.items():
        assert held_family[family] == round(0.4 * n), family
    # Fixed by the seed, in the bank's order; another seed holds out other facts.
    assert split_by_fact(bank, 0.4, seed=0) == (train, held)
    assert [q.prompt for q in held] == [q.prompt for q in bank if q in held]
    assert split_by_fact(bank, 0.4, seed=1)[1] != held


def test_split_keeps_one_fact_out_and_one_in_for_small_families():
    bank = [q for q in question_bank() if q.family == "capital"][:2]
    bank += [q for q in question_bank() if q.family == "plural"][:1]
    train, held = split_by_fact(bank, 0.1, seed=0)
    assert Counter(q.family for q in held) == {"capital": 1}
    assert Counter(q.family for q in train) == {"capital": 1, "plural": 1}
    with pytest.raises(ValueError, match="held_out_frac"):
        split_by_fact(bank, 1.0, seed=0)


def test_no_question_already_names_its_answer():
    # A question that contains its own answer would be judged correct when merely restated.
    for q in question_bank():
        assert not any(names(q.prompt, a) for a in q.answers), q.prompt
