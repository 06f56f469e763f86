"""The short-answer judge: normalization, whole-word containment, rivals, metrics, files."""

from __future__ import annotations

import json

import pytest

from eopd_ray.evaluation.short_answer import (
    QuestionFileError,
    ShortAnswer,
    is_correct,
    judge_completions,
    names,
    normalize,
    read_questions,
    write_questions,
)

CAIRO = ShortAnswer(
    "What is the capital of Egypt?", ("Cairo",), ("Paris", "Rome"), "capital", "Egypt"
)
SUM = ShortAnswer("What is 3 + 4?", ("7", "seven"), ("3", "4", "6", "8"), "sum", "3+4")


def test_normalize_lowercases_strips_accents_and_punctuation():
    assert normalize("  Brasília,  BRAZIL!\n") == " brasilia brazil "
    assert normalize("...") == "  "


def test_names_matches_whole_words_only():
    assert names("The capital is Cairo.", "cairo")
    assert names("It is New  Delhi!", "New Delhi")
    assert not names("Cairoville", "Cairo")
    assert not names("17 legs", "7")
    assert not names("anything", "  ")  # an empty answer names nothing


def test_a_sentence_containing_the_answer_is_correct():
    assert is_correct(CAIRO, "The capital of Egypt is Cairo.")
    assert is_correct(CAIRO, "cairo")
    assert not is_correct(CAIRO, "The capital of Egypt is Alexandria.")
    assert not is_correct(CAIRO, "")


def test_naming_a_rival_too_is_wrong_unless_the_question_names_it():
    assert not is_correct(CAIRO, "Cairo, or maybe Paris, or Rome.")
    # The operands are rivals, but the question names them: restating it is fine.
    assert is_correct(SUM, "3 + 4 = 7")
    assert is_correct(SUM, "Three plus four is seven.")
    assert not is_correct(SUM, "3 + 4 = 8, or 7")
    assert not is_correct(SUM, "It is 6 or 7.")


def test_a_rival_equal_to_an_accepted_answer_is_ignored():
    q = ShortAnswer("What is the opposite of hot?", ("cold",), ("Cold", "warm"))
    assert is_correct(q, "Cold.")


def test_judge_completions_computes_avg_pass_and_families():
    questions = [CAIRO, SUM]
    completions = [["Cairo", "Paris", "Cairo.", "no idea"], ["7", "7", "7", "7"]]
    out = judge_completions(questions, completions, k=2)
    assert out["eval/avg@2"] == pytest.approx((2 / 4 + 1) / 2)
    assert out["eval/pass@1"] == pytest.approx(out["eval/avg@2"])
    # Egypt: 2 correct of 4, pass@2 = 1 - C(2,2)/C(4,2) = 5/6; the sum: 1.
    assert out["eval/pass@2"] == pytest.approx((5 / 6 + 1) / 2)
    assert out["eval/capital/avg@2"] == pytest.approx(0.5)
    assert out["eval/sum/avg@2"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 questions but 1"):
        judge_completions(questions, completions[:1], k=2)


def test_questions_round_trip_through_jsonl(tmp_path):
    path = tmp_path / "q.jsonl"
    extra = ShortAnswer("Q?", ("a",), (), "", "", {"source": "hand"})
    write_questions(path, [CAIRO, SUM, extra])
    back = read_questions(path)
    assert back == [CAIRO, SUM, extra]
    assert back[2].extra == {"source": "hand"}
    assert json.loads(path.read_text().splitlines()[0])["answers"] == ["Cairo"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "line 2: not JSON"),
        ("[1, 2]", "line 2: expected a JSON object"),
        ('{"answers": ["a"]}', "line 2: no non-empty string 'prompt'"),
        ('{"prompt": "Q?", "answers": "a"}', "line 2: 'answers' must be a list of strings"),
        ('{"prompt": "Q?", "answers": ["  "]}', "line 2: 'answers' holds no non-empty answer"),
        ('{"prompt": "Q?", "answers": ["a"], "rivals": [1]}', "'rivals' must be a list"),
    ],
)
def test_malformed_question_files_name_the_line(tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"prompt": "ok?", "answers": ["ok"]}\n' + line + "\n")
    with pytest.raises(QuestionFileError, match=message.replace("[", r"\[")):
        read_questions(path)


def test_missing_or_empty_question_files_are_refused(tmp_path):
    with pytest.raises(QuestionFileError, match="cannot read"):
        read_questions(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(QuestionFileError, match="no questions"):
        read_questions(tmp_path / "empty.jsonl")
