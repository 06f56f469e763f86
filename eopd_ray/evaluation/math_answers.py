"""Math evaluation: answer extraction, equivalence checking, Avg@k and Pass@k.

    extract_boxed(r"... so the answer is \\boxed{\\frac{1}{2}}.")  -> "\\frac{1}{2}"
    is_equivalent("0.5", "\\frac12")                              -> True
    pass_at_k(n=16, c=3, k=8)                                     -> unbiased estimate

Equivalence is mathematical, not textual: both sides are parsed to sympy by `math-verify`
(fractions, decimals, LaTeX, intervals, sets, percentages, degrees, units and `\\text{}`). This
module imports neither Ray, vLLM nor DeepSpeed; generation lives in jobs/evaluate.py.

Benchmark files are JSONL, one problem per line: {"id": ..., "problem": ..., "answer": ...}
(see docs/evaluation.md; jobs/convert_benchmarks.py writes them from the public releases).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eopd_ray.errors import EopdError

_BOX_COMMANDS = ("\\boxed", "\\fbox")


class BenchmarkError(EopdError):
    """A benchmark file is malformed; names the file and line."""


def extract_boxed(text: str) -> str | None:
    """The content of the LAST `\\boxed{...}` / `\\fbox{...}` (nested braces allowed), or of a
    brace-less `\\boxed 5`; None when there is none or its braces never close."""
    start, command = -1, ""
    for cmd in _BOX_COMMANDS:
        pos = text.rfind(cmd)
        if pos > start:
            start, command = pos, cmd
    if start < 0:
        return None
    rest = text[start + len(command) :]
    if rest.startswith("{"):
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"{": 1, "}": -1}.get(ch, 0)
            if depth == 0:
                return rest[1:i].strip()
        return None  # unbalanced: the answer was cut off
    if rest[:1].isspace():  # "\boxed 5": the next token, up to whitespace or a math delimiter
        token = rest.strip().split()[0] if rest.strip() else ""
        token = token.rstrip("$.,;")
        return token or None
    return None


def is_equivalent(prediction: str, reference: str) -> bool:
    """Whether two answers are mathematically equal (math-verify over sympy). Malformed input is
    simply not equivalent."""
    from math_verify import parse, verify

    # math-verify bounds parsing and checking with SIGALRM, which only works on the main thread.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"${reference}$", parsing_timeout=timeout)
        pred = parse(f"${prediction}$", parsing_timeout=timeout)
        if not gold or not pred:
            return prediction.strip() == reference.strip() != ""
        return bool(verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # math-verify raises on pathological input; a wrong answer, not a crash
        return False


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str


def load_benchmark(path: str | Path) -> list[Problem]:
    """Problems of one benchmark JSONL file; errors name the file and line."""
    path = Path(path)
    problems = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BenchmarkError(f"{path}: cannot read benchmark file: {exc.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchmarkError(f"{path}, line {number}: not JSON ({exc.msg})") from None
        missing = [k for k in ("problem", "answer") if not str(row.get(k, "")).strip()]
        if missing:
            raise BenchmarkError(f"{path}, line {number}: missing or empty {missing}")
        problems.append(
            Problem(str(row.get("id", number)), str(row["problem"]), str(row["answer"]))
        )
    if not problems:
        raise BenchmarkError(f"{path}: no problems")
    return problems


@dataclass(frozen=True)
class BenchmarkScore:
    name: str
    num_problems: int
    num_samples: int  # per problem
    k: int
    avg_at_k: float  # percent: mean over problems of the fraction of correct samples
    pass_at_k: float  # percent: unbiased Pass@k averaged over problems


def score_benchmark(
    name: str, problems: Sequence[Problem], completions: Sequence[Sequence[str]], k: int
) -> tuple[BenchmarkScore, list[dict]]:
    """Judge every completion (the last boxed answer vs the reference); returns the scores and
    one record per problem (answers extracted, which were correct)."""
    records, avg, passk = [], 0.0, 0.0
    for problem, samples in zip(problems, completions, strict=True):
        answers = [extract_boxed(s) for s in samples]
        correct = [a is not None and is_equivalent(a, problem.answer) for a in answers]
        n, c = len(samples), sum(correct)
        avg += c / n
        passk += pass_at_k(n, c, min(k, n))
        records.append(
            {"id": problem.id, "answer": problem.answer, "extracted": answers, "correct": correct}
        )
    count = len(problems)
    score = BenchmarkScore(
        name, count, len(completions[0]), k, 100 * avg / count, 100 * passk / count
    )
    return score, records


def report(scores: Sequence[BenchmarkScore]) -> tuple[dict, str]:
    """The paper's table layout: one row per benchmark and the unweighted mean, as JSON and
    markdown."""
    k = scores[0].k
    mean_avg = sum(s.avg_at_k for s in scores) / len(scores)
    mean_pass = sum(s.pass_at_k for s in scores) / len(scores)
    data = {
        "k": k,
        "benchmarks": {
            s.name: {
                f"avg@{k}": s.avg_at_k,
                f"pass@{k}": s.pass_at_k,
                "problems": s.num_problems,
                "samples": s.num_samples,
            }
            for s in scores
        },
        "mean": {f"avg@{k}": mean_avg, f"pass@{k}": mean_pass},
    }
    rows = [f"| benchmark | Avg@{k} | Pass@{k} |", "| --- | --- | --- |"]
    rows += [f"| {s.name} | {s.avg_at_k:.2f} | {s.pass_at_k:.2f} |" for s in scores]
    rows.append(f"| mean | {mean_avg:.2f} | {mean_pass:.2f} |")
    return data, "\n".join(rows) + "\n"
