"""Checkpoints: complete or absent, never half-written; resume from the newest complete one.

Layout under `<run.output_dir>/checkpoints/`:

    step-000012/           one complete checkpoint (after step 12)
      learner/             DeepSpeed state of every rank: weights, optimizer, LR scheduler
      state.json           step, weight version, data position, RNG states, format
      config.yaml          the resolved config of the run that wrote it
    .tmp-step-000016-*/    a checkpoint being written (ignored; removed on the next save)

A checkpoint is written into a temporary directory and renamed into place only when every part
is on disk, so a crash mid-write leaves the previous checkpoint intact. The last
`run.keep_checkpoints` are kept. Loading never unpickles arbitrary objects: JSON and YAML here,
`torch.load(weights_only=True)` for DeepSpeed's files (learner.py).
This module imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from eopd_ray.config import Config, load_config, save_config
from eopd_ray.errors import EopdError

FORMAT = 1
PREFIX = "step-"


class CheckpointError(EopdError):
    """A checkpoint cannot be used to resume this run; says why and what to do."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int  # the last completed step
    weight_version: int
    stream: dict[str, int]  # PromptStream.state_dict()


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / "checkpoints"


def begin(cfg: Config, step: int) -> Path:
    """A fresh temporary directory for the checkpoint after `step`."""
    root = checkpoint_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{PREFIX}{step:06d}-"))
    (tmp / "learner").mkdir()
    return tmp


def commit(cfg: Config, tmp: Path, step: int, weight_version: int, stream: dict[str, int]) -> Path:
    """Write the driver's part into `tmp` (the learners have written theirs), rename it into
    place, and drop checkpoints beyond `run.keep_checkpoints`."""
    state = {
        "format": FORMAT,
        "step": step,
        "weight_version": weight_version,
        "stream": stream,
        "rng": {"python": _jsonable(random.getstate()), "torch": torch.get_rng_state().tolist()},
    }
    (tmp / "state.json").write_text(json.dumps(state))
    save_config(cfg, tmp / "config.yaml")
    _fsync_tree(tmp)
    final = checkpoint_root(cfg) / f"{PREFIX}{step:06d}"
    if final.exists():  # the same step saved again (e.g. SIGTERM right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in complete_checkpoints(cfg)[: -cfg.run.keep_checkpoints]:
        shutil.rmtree(old.path, ignore_errors=True)
    return final


def complete_checkpoints(cfg: Config) -> list[Checkpoint]:
    """Every complete checkpoint, oldest first (temporary directories are skipped)."""
    out = []
    for path in sorted(checkpoint_root(cfg).glob(f"{PREFIX}*")):
        try:
            state = json.loads((path / "state.json").read_text())
        except (OSError, ValueError):
            continue  # not complete: never renamed into place by us
        out.append(Checkpoint(path, state["step"], state["weight_version"], state["stream"]))
    return out


def latest(cfg: Config) -> Checkpoint | None:
    found = complete_checkpoints(cfg)
    return found[-1] if found else None


# Keys that, changed, make a checkpoint meaningless or unloadable.
_BREAKING = {
    "model.student_path": "the learner state belongs to another student",
    "model.dtype": "the optimizer state was saved in another precision",
    "learner.num_workers": "DeepSpeed partitions the optimizer state by world size",
    "learner.zero_stage": "ZeRO stages store their state differently",
    "data.train_path": "the data position refers to another prompt file",
    "data.toy_prompts": "the data position refers to another prompt set",
    "data.seed": "the data position refers to another shuffle",
    "data.shuffle": "the data position refers to another order",
}


def check_compatible(cfg: Config, ckpt: Checkpoint) -> None:
    """Refuse to resume when the config changed in a way the checkpoint cannot follow."""
    saved = load_config(ckpt.path / "config.yaml")
    problems = []
    for key, why in _BREAKING.items():
        section, name = key.split(".")
        old, new = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
        if old != new:
            problems.append(f"{key} changed from {old!r} to {new!r} ({why})")
    if problems:
        raise CheckpointError(
            f"cannot resume from {ckpt.path}: " + "; ".join(problems) + ". Restore those keys, "
            "or start a fresh run with run.resume=never or another run.output_dir"
        )


def restore_rng(ckpt: Checkpoint) -> None:
    state = json.loads((ckpt.path / "state.json").read_text())["rng"]
    random.setstate(_tupled(state["python"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
