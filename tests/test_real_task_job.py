"""jobs/real_task.py: what it says when a step is missing, what the task depends on, and a
prepare run on tiny models that answer nothing (the teacher must get enough questions right)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from eopd_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "jobs" / "configs" / "real.yaml"
spec = importlib.util.spec_from_file_location("real_task", REPO / "jobs" / "real_task.py")
job = importlib.util.module_from_spec(spec)
spec.loader.exec_module(job)


def test_without_the_teacher_it_says_to_fetch_it(tmp_path, capsys):
    args = ["prepare", "--config", str(REAL), f"model.teacher_path={tmp_path / 'none'}"]
    assert job.main(args) == 2
    assert "run `make real-model`" in capsys.readouterr().err


def test_report_without_a_run_or_a_baseline_says_what_to_run(tiny_pair, tmp_path, capsys):
    student, teacher = tiny_pair
    common = [
        "--config",
        str(REAL),
        f"model.student_path={student}",
        f"model.teacher_path={teacher}",
        f"eval.short_answer_path={tmp_path / 'task' / 'eval.jsonl'}",
    ]
    assert job.main(["report", *common, f"run.output_dir={tmp_path / 'run'}"]) == 2
    assert "no exported student" in capsys.readouterr().err
    (tmp_path / "run" / "hf").mkdir(parents=True)
    (tmp_path / "run" / "hf" / "config.json").write_text("{}")
    assert job.main(["report", *common, f"run.output_dir={tmp_path / 'run'}"]) == 2
    assert "run `jobs/real_task.py prepare` first" in capsys.readouterr().err


def test_the_task_depends_on_the_teacher_the_template_and_the_bank():
    from eopd_ray.evaluation.question_bank import question_bank

    cfg, bank = load_config(REAL), question_bank()
    key = job.fingerprint(cfg, bank)
    assert key == job.fingerprint(cfg, question_bank())
    other = dataclasses.replace(cfg.model, teacher_path="elsewhere")
    assert job.fingerprint(dataclasses.replace(cfg, model=other), bank) != key
    raw = dataclasses.replace(cfg.data, teacher_template="raw")
    assert job.fingerprint(dataclasses.replace(cfg, data=raw), bank) != key
    assert job.fingerprint(cfg, bank[1:]) != key


def test_prepare_refuses_a_teacher_that_answers_too_few(tiny_pair, tmp_path):
    """The whole prepare path on tiny random models (vLLM in a child process): every question
    rendered, answered greedily and judged; none is right, so nothing is written."""
    student, teacher = tiny_pair
    task = tmp_path / "task"
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "real_task.py"), "prepare", "--config", str(REAL),
         f"model.student_path={student}", f"model.teacher_path={teacher}",
         "data.teacher_template=raw", "data.student_template=raw",
         f"data.train_path={task / 'train.jsonl'}",
         f"eval.short_answer_path={task / 'eval.jsonl'}", "eval.max_new_tokens=4",
         "rollout.kv_cache_bytes=16777216"],
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "the teacher answered only" in proc.stderr and "of 296 questions" in proc.stderr
    assert not task.exists() or not any(task.iterdir())
