"""jobs/convert_benchmarks.py on files shaped like the public releases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from eopd_ray.evaluation import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "jobs" / "convert_benchmarks.py"


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


def test_known_layouts_convert_to_loadable_benchmarks(tmp_path):
    math500 = tmp_path / "test.jsonl"
    math500.write_text(
        json.dumps({"problem": "1+1?", "answer": "2", "unique_id": "t/1.json", "solution": "..."})
        + "\n"
    )
    olympiad = tmp_path / "olympiad.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"id": 7, "question": "x?", "final_answer": ["$3$"]}]), olympiad
    )
    aime = tmp_path / "aime.json"
    aime.write_text(json.dumps([{"ID": "2024-I-1", "Problem": "p", "Answer": 204}]))
    for name, src, expected in [
        ("math500", math500, ("t/1.json", "2")),
        ("olympiadbench", olympiad, ("7", "3")),
        ("aime24", aime, ("2024-I-1", "204")),
    ]:
        out = tmp_path / f"{name}.jsonl"
        proc = convert("--benchmark", name, "--input", str(src), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        problem = load_benchmark(out)[0]
        assert (problem.id, problem.answer) == expected


def test_unknown_layout_asks_for_column_names(tmp_path):
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps({"q": "1+1", "a": "2"}) + "\n")
    proc = convert("--benchmark", "amc23", "--input", str(src), "--out", str(tmp_path / "o.jsonl"))
    assert proc.returncode != 0 and "--problem-column" in proc.stderr
    proc = convert(
        "--benchmark",
        "amc23",
        "--input",
        str(src),
        "--out",
        str(tmp_path / "o.jsonl"),
        "--problem-column",
        "q",
        "--answer-column",
        "a",
    )
    assert proc.returncode == 0 and load_benchmark(tmp_path / "o.jsonl")[0].answer == "2"
