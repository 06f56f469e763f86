"""Checkpoints: complete or absent, never half-written; resume from the newest complete one.

Layout under `<run.output_dir>/checkpoints/` (any storage eopd_ray.storage reaches):

    step-000012/           one checkpoint (after step 12)
      learner/             DeepSpeed state of every rank: weights, optimizer, LR scheduler
      config.yaml          the resolved config of the run that wrote it
      state.json           step, weight version, data position, RNG states, run id; written LAST

A checkpoint is complete exactly when its `state.json` exists and parses: every other part is
written (and, on local disks, synced) first, and `state.json` itself is written atomically (a
renamed temporary file locally, one PUT on an object store, which has no rename). A crash
mid-write leaves a step directory without it: ignored, and removed by the next save. The last
`run.keep_checkpoints` are kept. Loading never unpickles arbitrary objects: JSON and YAML here,
`torch.load(weights_only=True)` for DeepSpeed's files (learner.py).
This module imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eopd_ray.config import Config, config_from_dict, config_to_yaml
from eopd_ray.config_yaml import parse_yaml
from eopd_ray.errors import EopdError
from eopd_ray.storage import RunStorage

FORMAT = 2
ROOT = "checkpoints"
PREFIX = "step-"
STATE = "state.json"


class CheckpointError(EopdError):
    """A checkpoint cannot be used to resume this run; says why and what to do."""


@dataclass(frozen=True)
class Checkpoint:
    rel: str  # its directory, relative to the run directory
    uri: str  # where it is, for messages
    step: int  # the last completed step
    weight_version: int
    stream: dict[str, int]  # PromptStream.state_dict()
    run_id: str | None = None
    rng: dict = field(default_factory=dict, repr=False)


def step_dir(step: int) -> str:
    return f"{ROOT}/{PREFIX}{step:06d}"


def begin(store: RunStorage, step: int) -> str:
    """The (empty) directory for the checkpoint after `step`, relative to the run directory.
    Incomplete checkpoints left by a crash are removed first."""
    for name in store.listdir(ROOT):
        if name.startswith(PREFIX) and _read_state(store, f"{ROOT}/{name}") is None:
            store.delete(f"{ROOT}/{name}")
    rel = step_dir(step)
    store.delete(rel)  # the same step saved again (e.g. SIGTERM right after a periodic save)
    store.makedirs(f"{rel}/learner")
    return rel


def commit(
    store: RunStorage,
    rel: str,
    cfg: Config,
    step: int,
    weight_version: int,
    stream: dict[str, int],
) -> Checkpoint:
    """Write the driver's part into `rel` (the learners have written theirs), `state.json`
    last, and drop checkpoints beyond `run.keep_checkpoints`."""
    state = {
        "format": FORMAT,
        "step": step,
        "weight_version": weight_version,
        "run_id": cfg.run.id,
        "stream": stream,
        "rng": {"python": _jsonable(random.getstate()), "torch": torch.get_rng_state().tolist()},
    }
    store.write_text(f"{rel}/config.yaml", config_to_yaml(cfg))
    if store.is_local:
        _fsync_tree(store.local_path(rel))
    store.write_text(f"{rel}/{STATE}", json.dumps(state))
    for old in complete_checkpoints(store)[: -cfg.run.keep_checkpoints]:
        store.delete(old.rel)
    return _checkpoint(store, rel, state)


def _read_state(store: RunStorage, rel: str) -> dict | None:
    try:
        return json.loads(store.read_text(f"{rel}/{STATE}"))
    except (OSError, ValueError):
        return None  # not complete


def _checkpoint(store: RunStorage, rel: str, state: dict) -> Checkpoint:
    return Checkpoint(
        rel,
        store.path(rel) if store.is_local else f"{store.uri.rstrip('/')}/{rel}",
        state["step"],
        state["weight_version"],
        state["stream"],
        state.get("run_id"),
        state["rng"],
    )


def complete_checkpoints(store: RunStorage) -> list[Checkpoint]:
    """Every complete checkpoint, oldest first (incomplete ones are skipped)."""
    out = []
    for name in store.listdir(ROOT):
        if not name.startswith(PREFIX):
            continue
        state = _read_state(store, f"{ROOT}/{name}")
        if state is not None:
            out.append(_checkpoint(store, f"{ROOT}/{name}", state))
    return out


def latest(store: RunStorage) -> Checkpoint | None:
    found = complete_checkpoints(store)
    return found[-1] if found else None


def saved_config(store: RunStorage, rel: str) -> Config:
    """The config stored at `rel` (a YAML file in the run directory)."""
    return config_from_dict(parse_yaml(store.read_text(rel), rel), source=rel)


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


def check_compatible(cfg: Config, ckpt: Checkpoint, store: RunStorage) -> None:
    """Refuse to resume when the config changed in a way the checkpoint cannot follow."""
    saved = saved_config(store, f"{ckpt.rel}/config.yaml")
    problems = []
    for key, why in _BREAKING.items():
        section, name = key.split(".")
        old, new = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
        if old != new:
            problems.append(f"{key} changed from {old!r} to {new!r} ({why})")
    if problems:
        raise CheckpointError(
            f"cannot resume from {ckpt.uri}: " + "; ".join(problems) + ". Restore those keys, "
            "or start a fresh run with run.resume=never or another run.output_dir"
        )


def restore_rng(ckpt: Checkpoint) -> None:
    state = ckpt.rng
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
