"""Prepare the embedded default: prompt files, a trained toy teacher, a warmed-up student.

    prepared = prepare_toy(Path("runs/toy/prepared"), ToySettings())
    prepared / "teacher", prepared / "student", prepared / "train.jsonl", prepared / "eval.jsonl"

The result lives in `<root>/<key>`, where the key is a hash of every setting (task, model shapes,
training budget, seeds): a second call with the same settings returns at once, and different
settings never overwrite each other. `<root>/current` is a symlink to the newest preparation,
which is what `jobs/configs/toy.yaml` points at. The directory is built beside its final name
and renamed into place when complete, so an interrupted preparation leaves nothing half-made.

The teacher (about 1.1M parameters) and the student (about 0.16M) are trained only on the
training prompts; `eval.jsonl` holds prompts neither model nor the distillation ever sees.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from eopd_ray.toy.models import TinyModelSpec, build_causal_lm, build_tokenizer
from eopd_ray.toy.task import GraphTask

SETTINGS_FILE = "settings.json"
BASELINE_FILE = "baseline.json"  # held-out evaluation of the prepared teacher and student


TOY_TEACHER = TinyModelSpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4)  # ~1.1M
TOY_STUDENT = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2)  # ~0.16M


@dataclass(frozen=True)
class ToySettings:
    task: GraphTask = field(default_factory=GraphTask)
    eval_fraction: float = 0.2
    teacher: TinyModelSpec = TOY_TEACHER
    student: TinyModelSpec = TOY_STUDENT
    teacher_steps: int = 2000
    student_steps: int = 150  # a short warm-up: the student starts well below the teacher
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    eval_samples: int = 8

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _write_prompts(path: Path, prompts: list[str]) -> None:
    with path.open("w") as fh:
        for i, prompt in enumerate(prompts):
            fh.write(json.dumps({"id": i, "prompt": prompt}) + "\n")


def read_prompts(path: str | Path) -> list[str]:
    with Path(path).open() as fh:
        return [json.loads(line)["prompt"] for line in fh if line.strip()]


def prepare_toy(
    root: str | Path,
    settings: ToySettings = ToySettings(),
    log: Callable[[str], None] = print,
) -> Path:
    """The prepared directory for `settings` under `root`, built unless it exists."""
    from eopd_ray.toy.evaluate import evaluate_toy
    from eopd_ray.toy.train import train_supervised

    root = Path(root)
    final = root / settings.key()
    if not (final / SETTINGS_FILE).exists():
        staging = root / f"{settings.key()}.building"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        task = settings.task
        train, held_out = task.split(settings.eval_fraction)
        _write_prompts(staging / "train.jsonl", train)
        _write_prompts(staging / "eval.jsonl", held_out)
        tokenizer = build_tokenizer(
            staging / "tokenizer", corpus=[task.labels + ">:"], vocab_size=259
        )  # 256 bytes + 3 specials: no merges, one token per node label
        for role, spec, steps, offset in (
            ("teacher", settings.teacher, settings.teacher_steps, 1),
            ("student", settings.student, settings.student_steps, 2),
        ):
            started = time.monotonic()
            model_dir = build_causal_lm(
                staging / role, tokenizer, spec, seed=settings.seed + offset
            )

            def report(update: int, loss: float, role=role, steps=steps) -> None:
                if update % 250 == 0 or update == steps - 1:
                    log(f"  {role}: update {update + 1}/{steps}, loss {loss:.3f}")

            train_supervised(
                model_dir,
                task,
                train,
                steps=steps,
                batch_size=settings.batch_size,
                lr=settings.lr,
                seed=settings.seed + offset,
                on_step=report,
            )
            log(f"  {role}: trained in {time.monotonic() - started:.0f} s")
        shutil.rmtree(staging / "tokenizer")
        baseline = {
            "teacher": evaluate_toy(
                staging / "teacher", task, held_out, samples=settings.eval_samples
            ),
            "student": evaluate_toy(
                staging / "student",
                task,
                held_out,
                teacher_dir=staging / "teacher",
                samples=settings.eval_samples,
            ),
        }
        (staging / BASELINE_FILE).write_text(json.dumps(baseline, indent=2))
        (staging / SETTINGS_FILE).write_text(json.dumps(settings.as_dict(), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    _point_current_at(root, final.name)
    return final


def _point_current_at(root: Path, name: str) -> None:
    link = root / "current"
    tmp = root / f".current.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(name)
    os.replace(tmp, link)  # atomic: readers see the old or the new target, never neither


def load_baseline(prepared: str | Path) -> dict[str, dict[str, float]]:
    return json.loads((Path(prepared) / BASELINE_FILE).read_text())


def load_settings(prepared: str | Path) -> ToySettings:
    """The settings a prepared directory was built with."""
    raw = json.loads((Path(prepared) / SETTINGS_FILE).read_text())
    raw["task"] = GraphTask(**raw["task"])
    raw["teacher"] = TinyModelSpec(**raw["teacher"])
    raw["student"] = TinyModelSpec(**raw["student"])
    return ToySettings(**raw)


def ensure_toy_for_config(cfg, settings: ToySettings | None = None, log=print) -> Path:
    """`model.build_toy`: prepare the toy task under `<root>` (model.student_path is
    `<root>/current/student`) unless a preparation is already there, e.g. one `make run` or an
    earlier job made. Returns the prepared directory."""
    student = Path(cfg.model.student_path)
    root = student.parent.parent
    if (student / "config.json").exists():
        return student.parent.resolve()
    import torch

    settings = settings or ToySettings()
    log(f"toy models: none at {student}; preparing them in {root / settings.key()} (~2 min)")
    previous = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # nothing else runs yet: use every core
    try:
        return prepare_toy(root, settings, log=log)
    finally:
        torch.set_num_threads(previous)
