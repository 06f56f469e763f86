"""Prompt sources, rendering, and the resumable prompt stream."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eopd_ray.config import DataConfig
from eopd_ray.core.prompts import (
    DataError,
    PromptStream,
    load_prompt_texts,
    render_prompt,
    toy_prompts,
)


def test_stream_covers_every_prompt_once_per_epoch_and_resumes_exactly():
    stream = PromptStream(10, seed=3, shuffle=True, epochs=2)
    taken = [stream.take(4) for _ in range(5)]
    flat = [i for chunk in taken for i in chunk]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]  # reshuffled per epoch
    with pytest.raises(StopIteration):
        stream.take(1)
    again = PromptStream(10, seed=3, shuffle=True, epochs=2)
    again.take(4)
    again.take(4)
    resumed = PromptStream(10, seed=3, shuffle=True, epochs=2)
    resumed.load_state_dict(again.state_dict())
    assert [resumed.take(4) for _ in range(3)] == taken[2:]


def test_toy_prompts_are_deterministic():
    assert toy_prompts(5, 1) == toy_prompts(5, 1) != toy_prompts(5, 2)


def test_reads_jsonl_and_parquet_with_suffix(tmp_path):
    rows = [{"question": "1 + 1?", "answer": "2"}, {"question": "2 + 2?", "answer": "4"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet, f"file://{parquet}"):
        cfg = DataConfig(train_path=str(path), prompt_column="question", prompt_suffix="Think.")
        assert load_prompt_texts(cfg) == ["1 + 1? Think.", "2 + 2? Think."]


@pytest.mark.parametrize(
    "content, column, words",
    [
        ('{"prompt": "ok"}\n{"prompt": ""}\n', "prompt", "row 1, column 'prompt'"),
        ('{"text": "ok"}\n', "prompt", "no column 'prompt'"),
        ("{not json\n", "prompt", "cannot read as jsonl"),
    ],
)
def test_bad_prompt_files_name_file_row_and_column(tmp_path, content, column, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as exc:
        load_prompt_texts(DataConfig(train_path=str(path), prompt_column=column))
    assert words in str(exc.value) and str(path) in str(exc.value)
    with pytest.raises(DataError, match="no such prompt file"):
        load_prompt_texts(DataConfig(train_path=str(tmp_path / "missing.jsonl")))


def test_render_raw_and_chat(tiny_pair):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    raw = render_prompt("what is 1 + 2?", "raw", tok)
    assert tok.decode(raw) == "what is 1 + 2?"
    chat = tok.decode(render_prompt("what is 1 + 2?", "chat_no_think", tok))
    assert chat.startswith("<|im_start|>user\nwhat is 1 + 2?<|im_end|>")
    assert chat.endswith("<think>\n\n</think>\n\n")


def test_too_few_prompts_names_data_toy_prompts_for_synthetic_data(tiny_pair, tmp_path):
    """Issue 33: run.steps past synthetic data suggested data.epochs only."""
    from eopd_ray.config import config_from_dict
    from eopd_ray.core.prompts import tokenize_prompts

    models = {"student_path": str(tiny_pair[0]), "teacher_path": str(tiny_pair[1])}
    toy = config_from_dict({"model": models, "data": {"toy_prompts": 4}, "run": {"steps": 10}})
    needed = 10 * toy.rollout.prompts_per_step // toy.data.epochs
    with pytest.raises(DataError) as exc:
        tokenize_prompts(toy)
    assert f"lower run.steps or raise data.toy_prompts to at least {needed} or data.epochs" in (
        str(exc.value)
    )
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i} + 1"}) + "\n" for i in range(4)))
    from_file = config_from_dict(
        {"model": models, "data": {"train_path": str(path)}, "run": {"steps": 10}}
    )
    with pytest.raises(DataError) as exc:
        tokenize_prompts(from_file)
    assert str(exc.value).endswith("lower run.steps or raise data.epochs")
