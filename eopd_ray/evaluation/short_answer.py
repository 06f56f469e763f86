"""Short-answer questions and their judge: "What is the capital of Egypt?" -> "Cairo".

    q = ShortAnswer("What is the capital of Egypt?", ("Cairo",), rivals=("Paris", "Rome"))
    is_correct(q, "The capital of Egypt is Cairo.")           -> True
    is_correct(q, "Cairo, or maybe Paris.")                   -> False (a rival is named too)
    metrics = judge_completions(questions, completions, k=4)  # eval/avg@4, eval/pass@4, ...
    write_questions(path, questions); read_questions(path)    # JSONL, one question a line

An answer is correct when, after normalization (lower case, accents and punctuation removed,
whitespace collapsed), it contains one of the accepted answers as whole words and names none of
the question's rivals (the other answers of its family: other capitals, other colours, other
numbers) that the question itself does not contain. Containment, not equality, because a chat
model answers in a sentence ("The capital of Egypt is Cairo."); the rivals, because containment
alone would pass an answer that lists every capital it knows. The judge is the same for the
teacher, the student before and after training, and the held-out evaluation during a run.

Files are JSONL: {"prompt": str, "answers": [str, ...], "rivals": [str, ...], "family": str,
"fact": str} per line ("rivals", "family" and "fact" optional). Pure Python: imports neither
torch, Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from eopd_ray.errors import EopdError
from eopd_ray.evaluation.math_answers import pass_at_k


class QuestionFileError(EopdError):
    """A short-answer question file is malformed; names the file and line."""


@dataclass(frozen=True)
class ShortAnswer:
    prompt: str  # the question as the user asks it (rendered with the chat template later)
    answers: tuple[str, ...]  # accepted answers, any one suffices ("7", "seven")
    rivals: tuple[str, ...] = ()  # wrong answers of the same family that must not be named
    family: str = ""  # "capital", "sum", ...: metrics per family, and the stratified split
    fact: str = ""  # what the question asks about ("Egypt"): the unit of the train/held-out split
    extra: dict = field(default_factory=dict, compare=False)  # anything else on the line


_NON_WORD = re.compile(r"[^a-z0-9]+")


def normalize(text: str) -> str:
    """Lower case, accents stripped, every run of non-alphanumerics one space, padded with one
    space each side so that whole-word containment is a substring test: " cairo "."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return f" {_NON_WORD.sub(' ', plain.lower()).strip()} "


def names(text: str, answer: str) -> bool:
    """Whether `text` contains `answer` as whole words (both normalized)."""
    wanted = normalize(answer)
    return wanted.strip() != "" and wanted in normalize(text)


def is_correct(question: ShortAnswer, response: str) -> bool:
    """An accepted answer named, and no rival that the question does not name itself."""
    if not any(names(response, a) for a in question.answers):
        return False
    return not any(
        names(response, r) and not names(question.prompt, r)
        for r in question.rivals
        if not any(normalize(r) == normalize(a) for a in question.answers)
    )


def judge_completions(
    questions: Sequence[ShortAnswer], completions: Sequence[Sequence[str]], k: int
) -> dict[str, float]:
    """`eval/avg@k` (mean over questions of the fraction of correct samples), `eval/pass@1`,
    `eval/pass@k` (unbiased, over all samples) and `eval/<family>/avg@k` per family."""
    if len(questions) != len(completions):
        raise ValueError(f"{len(questions)} questions but {len(completions)} completion lists")
    verdicts = [
        [is_correct(q, c) for c in samples]
        for q, samples in zip(questions, completions, strict=True)
    ]
    n = len(questions)
    out = {f"eval/avg@{k}": sum(sum(v) / len(v) for v in verdicts) / n}
    for kk in sorted({1, k}):
        out[f"eval/pass@{kk}"] = sum(pass_at_k(len(v), sum(v), kk) for v in verdicts) / n
    families: dict[str, list[float]] = {}
    for q, v in zip(questions, verdicts, strict=True):
        families.setdefault(q.family or "all", []).append(sum(v) / len(v))
    for family, fractions in sorted(families.items()):
        out[f"eval/{family}/avg@{k}"] = sum(fractions) / len(fractions)
    return out


def to_record(question: ShortAnswer) -> dict:
    """The JSON line of a question (extra keys kept)."""
    return {
        "prompt": question.prompt,
        "answers": list(question.answers),
        "rivals": list(question.rivals),
        "family": question.family,
        "fact": question.fact,
        **question.extra,
    }


def write_questions(path: str | Path, questions: Sequence[ShortAnswer]) -> None:
    """One JSON line per question, written to a temporary file renamed into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(to_record(q)) + "\n" for q in questions))
    tmp.replace(path)


def _strings(value: object, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise QuestionFileError(f"{where}: {key!r} must be a list of strings, got {value!r}")
    return tuple(value)


def read_questions(path: str | Path) -> list[ShortAnswer]:
    """The questions of a JSONL file; QuestionFileError naming the file and line when a line is
    not a JSON object with a non-empty "prompt" and at least one non-empty answer."""
    questions = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise QuestionFileError(f"{path}: cannot read the question file ({exc})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuestionFileError(f"{where}: not JSON ({exc})") from None
        if not isinstance(row, dict):
            raise QuestionFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
        prompt = row.pop("prompt", None)
        if not isinstance(prompt, str) or not prompt.strip():
            raise QuestionFileError(f"{where}: no non-empty string 'prompt'")
        answers = _strings(row.pop("answers", None), "answers", where)
        if not any(normalize(a).strip() for a in answers):
            raise QuestionFileError(f"{where}: 'answers' holds no non-empty answer")
        rivals = _strings(row.pop("rivals", []), "rivals", where)
        family, fact = str(row.pop("family", "")), str(row.pop("fact", ""))
        questions.append(ShortAnswer(prompt, answers, rivals, family, fact, row))
    if not questions:
        raise QuestionFileError(f"{path}: no questions")
    return questions
