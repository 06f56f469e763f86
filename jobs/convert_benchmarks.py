"""Convert a public release of a math benchmark or training set into eopd-ray's files.

    python jobs/convert_benchmarks.py --benchmark math500 --input test.jsonl \
        --out data/math500.jsonl
    python jobs/convert_benchmarks.py --benchmark dapo_math \
        --input dapo-math-17k.parquet --out /data/dapo_math.parquet

A benchmark becomes JSONL, one problem per line: {"id": ..., "problem": ..., "answer": ...}.
Inputs are the files a user downloads from the public releases (JSONL, JSON lists or parquet,
read with pyarrow). Known layouts (column names of the common Hugging Face releases) are built
in; any other benchmark layout works with --problem-column / --answer-column / --id-column.
Nothing is downloaded.

A training set (`dapo_math`) becomes a prompt file with the same three columns, parquet when
--out ends in .parquet (else JSONL), for `data.prompt_column: problem`. DAPO-Math-17k keeps each
prompt as a chat message wrapped in DAPO's own instruction ("Solve the following math problem
step by step. The last line of your response should be of the form Answer: $Answer ...");
the wrapper is stripped so that `data.prompt_suffix` is the only instruction the student sees.
The public file repeats every problem many times (about 1.79M rows for about 17.4k distinct
problems): duplicates are dropped, a problem seen with two different answers is dropped
altogether, and `--language en` (the default) keeps the problems without CJK characters, about
14.1k: the "about 14k" DAPO-Math problems of the paper's 4B recipe.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

# benchmark -> (problem column, answer column, id column or None), tried in order.
KNOWN_LAYOUTS: dict[str, list[tuple[str, str, str | None]]] = {
    "math500": [("problem", "answer", "unique_id")],  # HuggingFaceH4/MATH-500
    "amc23": [("question", "answer", "id"), ("problem", "answer", "id")],  # math-ai/amc23
    "minerva": [("question", "answer", None), ("problem", "solution", None)],  # math-ai/minervamath
    # Hothan/OlympiadBench, OE_TO_maths_en_COMP (675 problems): final_answer is a list.
    "olympiadbench": [("question", "final_answer", "id")],
    "aime24": [("problem", "answer", "id"), ("Problem", "Answer", "ID")],  # HuggingFaceH4/aime_2024
    "aime25": [("problem", "answer", "id"), ("question", "answer", "id")],  # math-ai/aime25
}


TRAINING_SETS = ("dapo_math",)

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be "
    "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
)
DAPO_SUFFIX = 'Remember to put your answer on its own line after "Answer:"'
_DAPO_WRAPPER = re.compile(
    rf"\A\s*{re.escape(DAPO_PREFIX)}\s*(?P<problem>.*?)\s*{re.escape(DAPO_SUFFIX)}\.?\s*\Z",
    re.DOTALL,
)
_CJK = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff]")  # as open-r1's en/cn split


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def iter_rows(path: Path, columns: list[str]) -> Iterator[dict]:
    """Rows with only `columns` (those the file has); parquet is streamed in record batches, so
    the 1.79M-row DAPO-Math file never sits in memory as Python objects all at once."""
    if path.suffix != ".parquet":
        yield from read_rows(path)
        return
    import pyarrow.parquet as pq

    source = pq.ParquetFile(path)
    present = [c for c in columns if c in source.schema_arrow.names]
    for record_batch in source.iter_batches(batch_size=65536, columns=present):
        yield from record_batch.to_pylist()


def pick_layout(
    rows: list[dict], name: str, args: argparse.Namespace
) -> tuple[str, str, str | None]:
    if args.problem_column:
        return args.problem_column, args.answer_column or "answer", args.id_column
    columns = set(rows[0])
    for layout in KNOWN_LAYOUTS.get(name, []):
        if layout[0] in columns and layout[1] in columns:
            return layout
    sys.exit(
        f"error: {args.input}: no known {name} layout in columns {sorted(columns)}; "
        "name them with --problem-column and --answer-column"
    )


def answer_text(value) -> str:
    if isinstance(value, list):  # OlympiadBench stores answers as a list of LaTeX strings
        value = ", ".join(str(v) for v in value)
    text = str(value).strip()
    return text[1:-1].strip() if text.startswith("$") and text.endswith("$") else text


def dapo_problem(prompt: object) -> str:
    """The bare problem of one DAPO-Math `prompt`: the last user message's content (or the text
    itself) without DAPO's instruction wrapper. ValueError when the wrapper is not there."""
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise ValueError("no user message in the prompt")
        prompt = users[-1].get("content")
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt is neither text nor a list of chat messages: {prompt!r:.80}")
    match = _DAPO_WRAPPER.match(prompt)
    if match is None or not match["problem"]:
        raise ValueError(f"no DAPO instruction wrapper around the problem: {prompt!r:.120}")
    return match["problem"]


def convert_dapo_math(rows: Iterable[dict], source: Path, language: str) -> list[dict]:
    """DAPO-Math rows (`prompt` messages, `reward_model.ground_truth`) -> unique problems in
    first-seen order. Prints what was dropped and why."""
    answers: dict[str, set[str]] = {}
    kept: dict[str, dict] = {}
    number = -1
    for number, row in enumerate(rows):
        try:
            problem = dapo_problem(row.get("prompt"))
        except ValueError as exc:
            sys.exit(f"error: {source}, row {number}, column 'prompt': {exc}")
        truth = (row.get("reward_model") or {}).get("ground_truth")
        if truth is None or not answer_text(truth):
            sys.exit(f"error: {source}, row {number}: no reward_model.ground_truth answer")
        answers.setdefault(problem, set()).add(answer_text(truth))
        if problem not in kept:
            ident = (row.get("extra_info") or {}).get("index")
            kept[problem] = {
                "id": str(ident if ident is not None else number),
                "problem": problem,
                "answer": answer_text(truth),
            }
    conflicting = [p for p, a in answers.items() if len(a) > 1]
    for problem in conflicting:
        del kept[problem]
    foreign = [p for p in kept if language == "en" and _CJK.search(p)]
    for problem in foreign:
        del kept[problem]
    print(
        f"dapo_math: {number + 1} rows, {len(answers)} distinct problems; dropped "
        f"{len(conflicting)} with conflicting answers and {len(foreign)} not in English "
        f"(--language {language}); kept {len(kept)}"
    )
    return list(kept.values())


def convert_benchmark(rows: list[dict], args: argparse.Namespace) -> list[dict]:
    problem_col, answer_col, id_col = pick_layout(rows, args.benchmark, args)
    out = []
    for number, row in enumerate(rows):
        problem, answer = str(row.get(problem_col) or "").strip(), row.get(answer_col)
        if not problem or answer is None or not answer_text(answer):
            sys.exit(f"error: {args.input}, row {number}: empty {problem_col!r} or {answer_col!r}")
        ident = row.get(id_col) if id_col else None
        out.append(
            {
                "id": str(ident if ident is not None else number),
                "problem": problem,
                "answer": answer_text(answer),
            }
        )
    return out


def write_rows(rows: list[dict], out: str) -> str:
    """Parquet when `out` ends in .parquet, else JSONL; complete or absent, at a path or a URI
    (s3://...). Returns where, as shown to a user."""
    from eopd_ray.storage.outputs import write_output

    if out.split("?")[0].endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), sink)
        data: bytes | str = sink.getvalue().to_pybytes()
    else:
        data = "".join(json.dumps(r) + "\n" for r in rows)
    return write_output(out, data, "--out")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    names = sorted(KNOWN_LAYOUTS) + list(TRAINING_SETS)
    parser.add_argument("--benchmark", required=True, help=f"one of {names}")
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--out", required=True, help="JSONL or .parquet file: a path or a URI")
    parser.add_argument("--problem-column")
    parser.add_argument("--answer-column")
    parser.add_argument("--id-column")
    parser.add_argument(
        "--language",
        choices=["en", "all"],
        default="en",
        help="training sets: keep English problems only (default) or all",
    )
    args = parser.parse_args(argv)
    if not args.input.is_file():
        sys.exit(f"error: {args.input}: no such file")
    if args.benchmark == "dapo_math":
        rows = iter_rows(args.input, ["prompt", "reward_model", "extra_info"])
        out = convert_dapo_math(rows, args.input, args.language)
    else:
        rows = read_rows(args.input)
        if not rows:
            sys.exit(f"error: {args.input}: no rows")
        out = convert_benchmark(rows, args)
    if not out:
        sys.exit(f"error: {args.input}: no problems left to write")
    where = write_rows(out, args.out)
    print(f"{args.benchmark}: {len(out)} problems -> {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
