"""jobs/convert_benchmarks.py on files shaped like the public releases."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from eopd_ray.evaluation.math_answers import load_benchmark

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


DAPO_WRAP = (
    "Solve the following math problem step by step. The last line of your response should be "
    "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
    '\n\n{}\n\nRemember to put your answer on its own line after "Answer:".'
)


def dapo_row(problem: str, answer: str, index: str) -> dict:
    """One row of the public DAPO-Math-17k parquet."""
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": DAPO_WRAP.format(problem)}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": index},
    }


def test_dapo_math_becomes_a_deduplicated_prompt_file_the_4b_recipe_reads(tmp_path):
    from eopd_ray.config import load_config
    from eopd_ray.core.prompts import load_prompt_texts

    two_lines = "Let $x$ be real.\n\nFind $x$ if $x + 1 = 3$."
    rows = [
        dapo_row("What is $1+1$?", "2", "a"),
        dapo_row(two_lines, "2", "b"),
        dapo_row("Conflicting?", "5", "c"),
        dapo_row("What is $1+1$?", "2", "a-again"),  # the public file repeats every problem
        dapo_row("求 $2+3$ 的值。", "5", "d"),  # Chinese: dropped by --language en
        dapo_row("Conflicting?", "6", "e"),  # same problem, other answer: dropped altogether
        dapo_row(two_lines, "2", "b-again"),
    ]
    src = tmp_path / "dapo-math-17k.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = tmp_path / "dapo_math.parquet"
    proc = convert("--benchmark", "dapo_math", "--input", str(src), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "7 rows, 4 distinct problems" in proc.stdout and "kept 2" in proc.stdout
    table = pq.read_table(out).to_pylist()
    assert table == [
        {"id": "a", "problem": "What is $1+1$?", "answer": "2"},
        {"id": "b", "problem": two_lines, "answer": "2"},
    ]
    # The shipped 4B recipe names this file's columns; the prompt suffix is the only instruction.
    cfg = load_config(Path(__file__).resolve().parents[1] / "jobs/configs/paper/qwen3-4b-eopd.yaml")
    assert {cfg.data.prompt_column, cfg.data.answer_column} <= set(table[0])
    data = dataclasses.replace(cfg.data, train_path=str(out))
    texts = load_prompt_texts(data)
    assert texts[0] == f"What is $1+1$? {cfg.data.prompt_suffix}"
    assert all("Answer:" not in t for t in texts)
    every = tmp_path / "all.jsonl"
    proc = convert(
        "--benchmark", "dapo_math", "--input", str(src), "--out", str(every), "--language", "all"
    )
    assert proc.returncode == 0 and len(every.read_text().splitlines()) == 3


def test_dapo_math_without_the_wrapper_names_the_row(tmp_path):
    rows = [dapo_row("fine", "1", "a"), dapo_row("fine", "1", "b")]
    rows[1]["prompt"] = [{"role": "user", "content": "Just a bare problem."}]
    src = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    proc = convert("--benchmark", "dapo_math", "--input", str(src), "--out", str(tmp_path / "o"))
    assert proc.returncode != 0
    assert "row 1, column 'prompt'" in proc.stderr and "wrapper" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_out_takes_a_uri_for_jsonl_and_parquet(tmp_path, s3):
    """Issue 33: an output option takes a URI (a Path made `s3://b/x` into `s3:/b/x`)."""
    from eopd_ray.storage.run_storage import RunStorage

    src = tmp_path / "test.jsonl"
    src.write_text(json.dumps({"problem": "1+1?", "answer": "2", "unique_id": "t/1.json"}) + "\n")
    for name in ("math500.jsonl", "math500.parquet"):
        proc = convert("--benchmark", "math500", "--input", str(src), "--out", s3.uri(f"b/{name}"))
        assert proc.returncode == 0, proc.stderr
        assert s3.uri(f"b/{name}") in proc.stdout
    store = RunStorage(s3.uri("b"))
    assert set(store.listdir()) == {"math500.jsonl", "math500.parquet"}
    local = tmp_path / "copy.parquet"
    local.write_bytes(store.read_bytes("math500.parquet"))
    assert pq.read_table(local).to_pylist()[0]["answer"] == "2"
