"""A table of malformed inputs, each run through jobs/distill.py's entry point: every one fails
within seconds with exit code 2, a message naming the key/file/row and the fix, and no output
directory left behind. (NaN loss and a dead learner need a running pipeline: tests/e2e.)"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("distill", REPO / "jobs" / "distill.py")
distill = importlib.util.module_from_spec(spec)
spec.loader.exec_module(distill)

BASE = """
model: {student_path: STUDENT, teacher_path: TEACHER}
data: {toy_prompts: 64, max_prompt_tokens: 64}
rollout: {num_workers: 2, prompts_per_step: 8, max_new_tokens: 16, max_model_len: 256}
learner: {num_workers: 2, mini_batch_size: 4, micro_batch_size: 2}
run: {steps: 2, output_dir: OUT}
"""


def prompts_file(tmp: Path, rows: list[dict]) -> str:
    path = tmp / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def broken_copy(src: Path, tmp: Path, change) -> str:
    dst = tmp / "broken"
    shutil.copytree(src, dst)
    change(dst)
    return str(dst)


def other_vocab(src: Path, tmp: Path) -> str:
    from eopd_ray.toy.models import build_tokenizer

    def swap(dst: Path) -> None:
        tok = build_tokenizer(tmp / "tok", ["an entirely different corpus 987"], 300)
        for f in tok.iterdir():
            shutil.copy(f, dst / f.name)

    return broken_copy(src, tmp, swap)


# (name, YAML edits or None, overrides (may use STUDENT/TEACHER/TMP), words in the message)
CASES = [
    ("yaml syntax", "model: [unclosed\n", [], "YAML error at line"),
    ("duplicate yaml key", BASE + "run: {steps: 3}\n", [], "duplicate key 'run'"),
    ("unknown key", None, ["loss.entropy_treshold=0.5"], "did you mean 'loss.entropy_threshold'"),
    ("wrong type", None, ["learner.lr=fast"], "learner.lr: Input should be a valid number"),
    ("negative tau", None, ["loss.entropy_threshold=-0.1"], "loss.entropy_threshold"),
    ("clip eps out of range", None, ["loss.clip_eps=1.5"], "loss.clip_eps"),
    (
        "batch not divisible by mini-batch",
        None,
        ["learner.mini_batch_size=3"],
        "learner.mini_batch_size: must divide",
    ),
    (
        "mini-batch not divisible by learners",
        None,
        ["learner.num_workers=3", "learner.mini_batch_size=4"],
        "multiple of learner.num_workers",
    ),
    ("more rollout workers than prompts", None, ["rollout.num_workers=9"], "rollout.num_workers"),
    ("context too short", None, ["rollout.max_model_len=32"], "rollout.max_model_len"),
    ("one eos id only", None, ["teacher.student_eos_token_id=0"], "set together"),
    ("nucleus sampling in training", None, ["rollout.top_p=0.9"], "rollout.top_p: must be 1.0"),
    ("removed teacher engine", None, ["teacher.engine=vllm"], "teacher.engine: removed"),
    ("malformed override", None, ["loss.name"], "key.path=value"),
    ("missing config file", "MISSING", [], "cannot read the config file"),
    ("top-k above vocabulary", None, ["teacher.top_k=5000"], "lower teacher.top_k"),
    ("missing model directory", None, ["model.teacher_path=TMP/nowhere"], "model.teacher_path = "),
    ("corrupt model directory", None, ["model.teacher_path=CORRUPT"], "cannot load the model"),
    ("vocabulary mismatch", None, ["model.teacher_path=OTHERVOCAB"], "tokenizers differ"),
    (
        "missing dataset file",
        None,
        ["data.toy_prompts=0", "data.train_path=TMP/none.jsonl"],
        "no such prompt file",
    ),
    (
        "missing column",
        None,
        ["data.toy_prompts=0", "data.train_path=NOCOLUMN"],
        "no column 'prompt'",
    ),
    (
        "empty prompt",
        None,
        ["data.toy_prompts=0", "data.train_path=EMPTYPROMPT"],
        "row 1, column 'prompt'",
    ),
    (
        "over-long prompt",
        None,
        ["data.max_prompt_tokens=3", "data.overlong_prompts=error"],
        "data.max_prompt_tokens",
    ),
    ("too few prompts for the run", None, ["data.toy_prompts=8", "run.steps=5"], "run.steps"),
    ("both prompt sources", None, ["data.train_path=x.jsonl"], "set exactly one"),
    (
        "teacher chat template missing",
        None,
        ["data.teacher_template=chat", "model.teacher_path=NOCHAT"],
        "no chat template",
    ),
    ("unreachable RAY_ADDRESS", None, ["ENV:RAY_ADDRESS=127.0.0.1:1"], "RAY_ADDRESS"),
]


@pytest.mark.parametrize("name, yaml_text, overrides, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_fast_and_clearly(
    name, yaml_text, overrides, words, tiny_pair, tmp_path, capsys, monkeypatch
):
    student, teacher = tiny_pair
    out = tmp_path / "out"

    def no_chat(dst: Path) -> None:
        (dst / "chat_template.jinja").unlink()
        cfg = json.loads((dst / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg))

    lazy = {
        "CORRUPT": lambda: broken_copy(
            teacher, tmp_path, lambda d: (d / "config.json").write_text("{not json")
        ),
        "OTHERVOCAB": lambda: other_vocab(teacher, tmp_path),
        "NOCHAT": lambda: broken_copy(teacher, tmp_path, no_chat),
        "NOCOLUMN": lambda: prompts_file(tmp_path, [{"text": "hi"}]),
        "EMPTYPROMPT": lambda: prompts_file(tmp_path, [{"prompt": "fine"}, {"prompt": "  "}]),
    }
    args = []
    for o in overrides:
        if o.startswith("ENV:"):
            key, _, value = o[4:].partition("=")
            monkeypatch.setenv(key, value)
            continue
        for token, make in lazy.items():
            if token in o:
                o = o.replace(token, make())
        args.append(o.replace("TMP", str(tmp_path)))
    config = tmp_path / "config.yaml"
    text = BASE if yaml_text is None else yaml_text
    config.write_text(
        text.replace("STUDENT", str(student))
        .replace("TEACHER", str(teacher))
        .replace("OUT", str(out))
    )
    config_arg = str(tmp_path / "missing.yaml") if yaml_text == "MISSING" else str(config)
    started = time.perf_counter()
    code = distill.main(["--config", config_arg, "--no-progress", *args])
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err, err
    assert elapsed < 30, f"{name} took {elapsed:.1f}s to fail"
    assert not out.exists(), f"{name} left {out} behind"


def test_overrides_may_follow_flags(tmp_path, capsys):
    """`--config X a=b --no-progress c=d`: both overrides are read (and here both refused)."""
    config = tmp_path / "c.yaml"
    config.write_text("model: {student_path: s, teacher_path: t}\ndata: {toy_prompts: 8}\n")
    code = distill.main(["--config", str(config), "loss.nam=opd", "--no-progress", "run.stepz=2"])
    err = capsys.readouterr().err
    assert code == 2 and "loss.nam" in err and "run.stepz" in err
