"""A run directory belongs to exactly one run.

Each run gets an id (`run.id`: `<run.name>-<UTC time>-<4 hex>`, or the user's), stored in the
directory's `config.yaml` and in every checkpoint. When a run starts afresh (`run.resume: never`,
or `auto` with no complete checkpoint) and the directory holds an earlier run's files, those
move, untouched, to `previous/<its id>/` (on an object store file by file; an interrupted
move is finished by the next start, in the same place): a later `run.resume=auto` can then only
ever continue the run that wrote the directory's checkpoints, and `metrics.jsonl` holds one
run's history.
Imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time

from eopd_ray.config import Config
from eopd_ray.storage import checkpoint
from eopd_ray.storage.checkpoint import Checkpoint, CheckpointError
from eopd_ray.storage.run_storage import RunStorage

log = logging.getLogger(__name__)

PREVIOUS = "previous"
MOVING = ".moving"  # in previous/<id>/ while a move there is under way
CONFIG = "config.yaml"
# The run's outputs: ours (config, metrics, checkpoints, HF export, storage probe) and the toy
# report's (jobs/toy_report.py).
RUN_OUTPUTS = {
    CONFIG,
    "metrics.jsonl",
    "checkpoints",
    "hf",
    ".storage-check",
    "report.md",
    "eval.json",
    "plots",
}


def new_run_id(name: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{name}-{stamp}-{secrets.token_hex(2)}"


def stored_run_id(store: RunStorage) -> str | None:
    """The id in the directory's config.yaml (None: no config, or one written before ids)."""
    if not store.exists(CONFIG):
        return None
    try:
        return checkpoint.saved_config(store, CONFIG).run.id
    except Exception:  # an unreadable config is an earlier run's all the same
        return None


def begin_run(cfg: Config, store: RunStorage) -> tuple[Config, Checkpoint | None]:
    """(`cfg` with `run.id` set, the checkpoint to resume from or None). A fresh start moves an
    earlier run's files to `previous/<id>/` first."""
    ckpt = checkpoint.latest(store) if cfg.run.resume == "auto" else None
    if ckpt is not None:
        owner = ckpt.run_id or stored_run_id(store)
        if cfg.run.id is not None and owner is not None and cfg.run.id != owner:
            raise CheckpointError(
                f"run.id = {cfg.run.id!r}, but {store.uri} holds run {owner!r} (checkpoint "
                f"{ckpt.uri}): drop run.id to resume that run, or use run.resume=never (the "
                "old run moves to previous/) or another run.output_dir"
            )
        run_id = owner or cfg.run.id or new_run_id(cfg.run.name)
        return _with_id(cfg, run_id), ckpt
    moved = move_previous_run(store)
    if moved:
        log.warning(
            "%s held an earlier run (run.resume=%s starts afresh): moved it to %s",
            store.uri,
            cfg.run.resume,
            moved,
        )
    return _with_id(cfg, cfg.run.id or new_run_id(cfg.run.name)), None


def is_run_output(name: str) -> bool:
    """What a run writes at the top of its directory (anything else there, e.g. models a
    config builds beside its outputs, is not the run's to move)."""
    return (
        name in RUN_OUTPUTS
        or name.startswith("events.out.tfevents.")
        or (name.startswith("metrics.") and name.endswith(".jsonl"))
    )


def move_previous_run(store: RunStorage) -> str | None:
    """Move an earlier run's outputs to `previous/<old id>/`; returns where, or None."""
    leftovers = [name for name in store.listdir() if is_run_output(name)]
    if not leftovers:
        return None
    old_id = stored_run_id(store) or f"unnamed-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    dest, n = f"{PREVIOUS}/{old_id}", 1
    # The same id twice (an explicit run.id reused) gets a new place, unless that place holds
    # an interrupted move of this run: finish it there (no second partial copy).
    while store.exists(dest) and not store.exists(f"{dest}/{MOVING}"):
        n += 1
        dest = f"{PREVIOUS}/{old_id}.{n}"
    store.write_text(f"{dest}/{MOVING}", old_id)
    # config.yaml last: it names the run, so an interrupted move is found again by its id.
    for name in sorted(leftovers, key=lambda name: name == CONFIG):
        if name == checkpoint.ROOT and not store.is_local:
            # File by file: each commit marker first, so no half-moved checkpoint is "complete"
            # (a local rename moves the whole directory at once).
            for step in store.listdir(name):
                marker = f"{name}/{step}/{checkpoint.STATE}"
                if store.exists(marker):
                    store.move(marker, f"{dest}/{marker}")
        store.move(name, f"{dest}/{name}")
    store.delete(f"{dest}/{MOVING}")
    return store.show(dest)


def _with_id(cfg: Config, run_id: str) -> Config:
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, id=run_id))


def config_to_resume(cfg: Config, store: RunStorage) -> Config | None:
    """The config of the checkpoint `run.resume: auto` would continue from (None: a fresh run)."""
    ckpt = checkpoint.latest(store) if cfg.run.resume == "auto" else None
    return checkpoint.saved_config(store, f"{ckpt.rel}/{CONFIG}") if ckpt else None
