"""Prepare a toy task: prompt files, a trained toy teacher, a warmed-up student.

    prepared = prepare_toy(Path("runs/toy/prepared"), ToySettings())   # the shortest-path task
    prepared = prepare_toy(Path("runs/toy_chain/prepared"), default_settings("chain"))
    prepared / "teacher", prepared / "student", prepared / "train.jsonl", prepared / "eval.jsonl"

Two tasks (`ToySettings.task`): the graph task (task.py, short answers with branch points: the
embedded default, jobs/configs/toy.yaml) and the chain task (chain.py, long answers whose tokens
are mostly forced: jobs/configs/toy_chain.yaml). `default_settings(kind)` holds the training
budget tuned for each, so that the teacher is accurate and diverse and the warmed-up student
is well below it.

The result lives in `<root>/<key>`, where the key is a hash of every setting (task, model shapes,
training budget, seeds): a second call with the same settings returns at once, and different
settings never overwrite each other. `<root>/current` is a symlink to the newest preparation,
which is what the toy configs point at. The directory is built beside its final name and
renamed into place when complete, so an interrupted preparation leaves nothing half-made.

The teacher (about 1.1M parameters) and the student (about 0.16M) are trained only on the
training prompts, one token per character (a byte-level tokenizer without merges);
`eval.jsonl` holds prompts neither model nor the distillation ever sees.
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

from eopd_ray.building import removed_if_stopped
from eopd_ray.env import in_submitted_job
from eopd_ray.errors import EopdError
from eopd_ray.toy.chain import ChainTask
from eopd_ray.toy.models import TinyModelSpec, build_causal_lm, build_tokenizer
from eopd_ray.toy.task import GraphTask

TASKS: dict[str, type[GraphTask] | type[ChainTask]] = {"graph": GraphTask, "chain": ChainTask}

SETTINGS_FILE = "settings.json"
BASELINE_FILE = "baseline.json"  # held-out evaluation of the prepared teacher and student


TOY_TEACHER = TinyModelSpec(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4)  # ~1.1M
TOY_STUDENT = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2)  # ~0.16M


class ToyTaskMismatch(EopdError):
    """A config asks for one toy task, but its paths hold a preparation of the other."""


@dataclass(frozen=True)
class ToySettings:
    task: GraphTask | ChainTask = field(default_factory=GraphTask)
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
        """Every setting, JSON-ready (settings.json); the task's entry names its kind."""
        out = dataclasses.asdict(self)
        out["task"] = {"kind": self.task.kind, **out["task"]}
        return out

    def key(self) -> str:
        settings = self.as_dict()
        if self.task.kind == "graph":
            # Graph settings were hashed before the chain task existed: leaving the kind out
            # keeps their keys, and so the preparations cached under them.
            del settings["task"]["kind"]
        blob = json.dumps(settings, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def default_settings(kind: str = "graph") -> ToySettings:
    """The tuned settings of each task: "graph" (ToySettings()) or "chain"."""
    if kind == "graph":
        return ToySettings()
    if kind == "chain":
        return CHAIN_SETTINGS
    raise ValueError(f"unknown toy task {kind!r}; expected one of {sorted(TASKS)}")


# Measured on the 400 held-out prompts (8 samples each, 2 cores). The teacher's loss is at the
# task's floor (0.30 nats per token) by ~750 updates: held-out Avg@8 0.93, 17% of its answer
# tokens above tau, ~3.5 minutes. The student learns the task abruptly between ~250 and ~500
# updates (Avg@8 0.16 at 300, 0.43 at 400, 0.88 at 1000): 320 leaves it at Avg@8 ~0.2,
# Pass@8 ~0.8, making mostly branch-point errors (items not in the prompt, repeated items).
CHAIN_SETTINGS = ToySettings(
    task=ChainTask(),
    teacher_steps=1000,
    student_steps=320,
)


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
    root = Path(root)
    final = root / settings.key()
    if not (final / SETTINGS_FILE).exists():
        staging = root / f"{settings.key()}.building"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with removed_if_stopped(staging):  # a SIGTERM now leaves no half-built directory
            _build(staging, settings, log)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    _point_current_at(root, final.name)
    return final


class Progress:
    """A line at least every `every_s` seconds (and at the end) with an estimate of what is
    left: a job's log must not look stuck while the models train (2-30 minutes)."""

    def __init__(self, what: str, total: int, log: Callable[[str], None], every_s: float = 30.0):
        self.what, self.total, self.log, self.every_s = what, total, log, every_s
        self.started = self.last = time.monotonic()

    def __call__(self, done: int, loss: float) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("nan")
        self.log(
            f"  {self.what}: update {done}/{self.total} ({100 * done / self.total:.0f}%), "
            f"loss {loss:.3f}, {now - self.started:.0f} s so far, ~{left:.0f} s left"
        )


def _build(staging: Path, settings: ToySettings, log: Callable[[str], None]) -> None:
    from eopd_ray.toy.evaluate import evaluate_toy
    from eopd_ray.toy.train import train_supervised

    task = settings.task
    train, held_out = task.split(settings.eval_fraction)
    _write_prompts(staging / "train.jsonl", train)
    _write_prompts(staging / "eval.jsonl", held_out)
    tokenizer = build_tokenizer(
        staging / "tokenizer", corpus=[task.alphabet], vocab_size=259
    )  # 256 bytes + 3 specials: no merges, one token per character
    for role, spec, steps, offset in (
        ("teacher", settings.teacher, settings.teacher_steps, 1),
        ("student", settings.student, settings.student_steps, 2),
    ):
        started = time.monotonic()
        model_dir = build_causal_lm(staging / role, tokenizer, spec, seed=settings.seed + offset)

        progress = Progress(role, steps, log)

        def report(update: int, loss: float, progress=progress) -> None:
            progress(update + 1, loss)

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
        "teacher": evaluate_toy(staging / "teacher", task, held_out, samples=settings.eval_samples),
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
    kind = raw["task"].pop("kind", "graph")  # written before the chain task: no kind, a graph
    raw["task"] = TASKS[kind](**raw["task"])
    raw["teacher"] = TinyModelSpec(**raw["teacher"])
    raw["student"] = TinyModelSpec(**raw["student"])
    return ToySettings(**raw)


def preparation_threads() -> int:
    """Threads for preparing the toy models: every core from a terminal (`make run`: nothing
    else runs yet), but inside a submitted Ray job the threads the job was given
    (OMP_NUM_THREADS, 1 when unset): the head's machine runs other work, and on 2 busy cores
    every-core threads measured 5-30x slower than one."""
    if in_submitted_job():
        return max(1, int(os.environ.get("OMP_NUM_THREADS") or 1))
    return os.cpu_count() or 1


def ensure_toy_for_config(cfg, settings: ToySettings | None = None, log=print) -> Path:
    """`model.build_toy`: prepare the toy task `model.toy_task` ("graph" or "chain") under
    `<root>` (model.student_path is `<root>/current/student`) unless a preparation is already
    there, e.g. one `make run` or an earlier job made. Returns the prepared directory;
    ToyTaskMismatch when the one there is of the other task."""
    kind = getattr(cfg.model, "toy_task", "graph")
    student = Path(cfg.model.student_path)
    root = student.parent.parent
    if (student / "config.json").exists():
        prepared = student.parent.resolve()
        found = load_settings(prepared).task.kind if (prepared / SETTINGS_FILE).exists() else kind
        if found != kind:
            raise ToyTaskMismatch(
                f"model.toy_task is {kind!r}, but {prepared} holds a preparation of the "
                f"{found!r} task: point model.student_path, model.teacher_path and "
                "data.train_path at another root (the chain task's: runs/toy_chain/prepared), "
                "or fix model.toy_task"
            )
        return prepared
    import torch

    settings = settings or default_settings(kind)
    log(f"toy models: none at {student}; preparing them in {root / settings.key()} (~2-5 min)")
    previous = torch.get_num_threads()
    torch.set_num_threads(preparation_threads())
    try:
        return prepare_toy(root, settings, log=log)
    finally:
        torch.set_num_threads(previous)
