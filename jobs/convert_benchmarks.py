"""Convert a public release of a math benchmark into eopd-ray's benchmark JSONL.

    python jobs/convert_benchmarks.py --benchmark math500 --input test.jsonl \
        --out data/math500.jsonl

The output has one problem per line: {"id": ..., "problem": ..., "answer": ...}. Inputs are the
files a user downloads from the benchmarks' public releases (JSONL, JSON lists or parquet, read
with pyarrow). Known layouts (column names of the common Hugging Face releases) are built in; any
other layout works with --problem-column / --answer-column / --id-column. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
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


def read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--benchmark", required=True, help=f"one of {sorted(KNOWN_LAYOUTS)}")
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--problem-column")
    parser.add_argument("--answer-column")
    parser.add_argument("--id-column")
    args = parser.parse_args(argv)
    rows = read_rows(args.input)
    if not rows:
        sys.exit(f"error: {args.input}: no rows")
    problem_col, answer_col, id_col = pick_layout(rows, args.benchmark, args)
    lines = []
    for number, row in enumerate(rows):
        problem, answer = str(row.get(problem_col) or "").strip(), row.get(answer_col)
        if not problem or answer is None or not answer_text(answer):
            sys.exit(f"error: {args.input}, row {number}: empty {problem_col!r} or {answer_col!r}")
        ident = row.get(id_col) if id_col else None
        lines.append(
            json.dumps(
                {
                    "id": str(ident if ident is not None else number),
                    "problem": problem,
                    "answer": answer_text(answer),
                }
            )
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out.parent, prefix=f".{args.out.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, args.out)
    print(f"{args.benchmark}: {len(lines)} problems -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
