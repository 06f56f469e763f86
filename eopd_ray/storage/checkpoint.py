"""Checkpoints: complete or absent, never half-written; resume from the newest complete one.

Layout under `<run.output_dir>/checkpoints/` (any storage eopd_ray.storage.run_storage reaches):

    step-000012/           one checkpoint (after step 12)
      learner/             DeepSpeed state of every rank: weights, optimizer, LR scheduler
      config.yaml          the resolved config of the run that wrote it
      state.json           step, weight version, data position, RNG states, run id, the learner
                           files, what was trained on (see below); written LAST

A checkpoint is complete exactly when its `state.json` exists and parses: every other part is
written (and, on local disks, synced) first, and `state.json` itself is written atomically (a
renamed temporary file locally, one PUT on an object store, which has no rename). `commit`
refuses to write it unless every file the learner ranks reported is there, with the size they
reported (a rank's upload that failed or was cut short is never committed). A crash mid-write
leaves a step directory without it: ignored, and removed by the next save. Only a MISSING
`state.json` means incomplete: any other error reading it (an S3 503, NFS ESTALE) stops the run
naming the file, and a directory that holds a `state.json` is never deleted by clean-up (an
unparsable one is skipped with a warning and kept for a person to look at; when its step is
saved again it is moved aside to `checkpoints/kept-step-NNNNNN-unparsable-<time>/` first). The
last `run.keep_checkpoints` are kept.

What a resume must not change silently is checked against the checkpoint (`check_compatible`):
the keys in `_BREAKING`, the student and the teacher (a URI's objects too, by the listing it was
pinned to; a GGUF file by its sha256), a fingerprint of the kept prompts (every data key and the
files' contents decide which prompts the stream position counts in), and the LR schedule's shape
(`run.steps`, `learner.mini_batch_size` ... move a cosine schedule). A mismatch stops the run
unless `run.allow_config_change: true`, which the metrics then show (`run/config_changed`).

Loading never unpickles arbitrary objects: JSON and YAML here, `torch.load(weights_only=True)`
for DeepSpeed's files (learner.py).
This module imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from eopd_ray.config import Config, config_from_dict, config_to_dict, total_updates
from eopd_ray.config.strict_yaml import parse_yaml
from eopd_ray.errors import EopdError
from eopd_ray.storage.gguf_source import is_gguf, split_gguf_pin
from eopd_ray.storage.object_source import split_uri_pin
from eopd_ray.storage.run_storage import RunStorage, redacted, redacted_values

log = logging.getLogger(__name__)

FORMAT = 3  # 3: learner files, prompts fingerprint and schedule in state.json (2 still loads)
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
    trained_on: dict = field(default_factory=dict, repr=False)  # training_identity(); {}: format 2


def step_dir(step: int) -> str:
    return f"{ROOT}/{PREFIX}{step:06d}"


def begin(store: RunStorage, step: int) -> str:
    """The (empty) directory for the checkpoint after `step`, relative to the run directory.
    Incomplete checkpoints left by a crash (no `state.json`) are removed first. A complete
    checkpoint of the same step is replaced (e.g. SIGTERM right after a periodic save); one
    whose `state.json` does not parse is moved aside, never deleted (`set_aside`)."""
    for name in _listdir(store, ROOT):
        if name.startswith(PREFIX) and not _exists(store, f"{ROOT}/{name}/{STATE}"):
            store.delete(f"{ROOT}/{name}")
    rel = step_dir(step)
    if _exists(store, f"{rel}/{STATE}") and _read_state(store, rel) is None:
        set_aside(store, rel, "unparsable")
    store.delete(rel)
    store.makedirs(f"{rel}/learner")
    return rel


def set_aside(store: RunStorage, rel: str, why: str) -> str:
    """Move checkpoint `rel` to `checkpoints/kept-<its name>-<why>-<UTC time>/`, out of the
    names that are checkpoints (`step-*`), for a person to look at; returns where."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    kept = f"{ROOT}/kept-{posixpath.basename(rel)}-{why}-{stamp}"
    log.warning(
        "%s: its %s is %s; moving it to %s to save this step again (kept for you to look at: "
        "delete it once it is not needed)",
        store.show(rel),
        STATE,
        why,
        store.show(kept),
    )
    store.move(rel, kept)
    return kept


def _missing_or_short(
    store: RunStorage, rel: str, learner_files: dict[str, int | None]
) -> list[str]:
    """The learner files `rel` lacks or holds with another size than the rank reported."""
    try:
        found = store.file_sizes(rel)
    except OSError as exc:
        raise _storage_failure(store, rel, exc) from exc
    out = []
    for name, size in sorted(learner_files.items()):
        if name not in found:
            out.append(f"{name} (missing)")
        elif size is not None and found[name] != size:
            out.append(f"{name} ({found[name]} of {size} bytes)")
    return out


def commit(
    store: RunStorage,
    rel: str,
    cfg: Config,
    step: int,
    weight_version: int,
    stream: dict[str, int],
    learner_files: list[str] | dict[str, int | None],
    trained_on: dict | None = None,
    rng: dict | None = None,
) -> Checkpoint:
    """Write the driver's part into `rel` (the learners have written theirs: `learner_files`,
    relative to `rel`, with their sizes when known: learner_files.learner_file_sizes),
    `state.json` last, and drop checkpoints beyond `run.keep_checkpoints`. Refuses
    (CheckpointError) when a learner file is missing or has another size: a checkpoint without
    its learner state would be "complete" and fail every resume."""
    if not isinstance(learner_files, dict):
        learner_files = dict.fromkeys(learner_files)
    wrong = _missing_or_short(store, rel, learner_files)
    if not learner_files or wrong:
        what = f"{len(wrong)} of {len(learner_files)} learner files" if wrong else "no files"
        raise CheckpointError(
            f"checkpoint {store.show(rel)}: {what} from the learner ranks are not there whole "
            f"({', '.join(wrong[:3]) or 'none reported'}{', ...' if len(wrong) > 3 else ''}); "
            "not marking it complete. Another process may be writing the same run.output_dir "
            "(it deletes checkpoints it thinks are incomplete), or the storage lost the upload; "
            "the previous complete checkpoint is untouched"
        )
    state = {
        "format": FORMAT,
        "step": step,
        "weight_version": weight_version,
        "run_id": cfg.run.id,
        "stream": stream,
        "rng": rng or rng_state(),  # as they were at the step (a background upload ends later)
        "learner_files": sorted(learner_files),
        "trained_on": trained_on or {},
    }
    store.write_text(f"{rel}/config.yaml", stored_config_yaml(cfg))
    if store.is_local:
        _fsync_tree(store.local_path(rel))
    store.write_text(f"{rel}/{STATE}", json.dumps(state))
    for old in complete_checkpoints(store)[: -cfg.run.keep_checkpoints]:
        store.delete(old.rel)
    return _checkpoint(store, rel, state)


def _storage_failure(store: RunStorage, rel: str, exc: OSError) -> CheckpointError:
    return CheckpointError(
        f"cannot read {store.show(rel)}: {exc}. The run stops rather than take a checkpoint it "
        "cannot read for a missing one (that would delete it or start the run afresh); "
        "nothing was changed. Run again when the storage answers"
    )


def _exists(store: RunStorage, rel: str) -> bool:
    try:
        return store.exists(rel)
    except OSError as exc:
        raise _storage_failure(store, rel, exc) from exc


def _listdir(store: RunStorage, rel: str) -> list[str]:
    try:
        return store.listdir(rel)
    except OSError as exc:
        raise _storage_failure(store, rel, exc) from exc


def _read_state(store: RunStorage, rel: str) -> dict | None:
    """The parsed `state.json` of checkpoint `rel`, or None when it is incomplete: no state file
    (or an unparsable one, kept). Any other read error raises CheckpointError."""
    path = f"{rel}/{STATE}"
    try:
        text = store.read_text(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if not _exists(store, path):  # some filesystems raise a plain OSError when it is absent
            return None
        raise _storage_failure(store, path, exc) from exc
    try:
        return json.loads(text)
    except ValueError:  # also UnicodeDecodeError
        log.warning("%s does not parse: checkpoint skipped (and kept)", store.show(path))
        return None


def _checkpoint(store: RunStorage, rel: str, state: dict) -> Checkpoint:
    return Checkpoint(
        rel,
        store.show(rel),
        state["step"],
        state["weight_version"],
        state["stream"],
        state.get("run_id"),
        state["rng"],
        state.get("trained_on", {}),
    )


def complete_checkpoints(store: RunStorage) -> list[Checkpoint]:
    """Every complete checkpoint, oldest first (incomplete ones are skipped)."""
    out = []
    for name in _listdir(store, ROOT):
        if not name.startswith(PREFIX):
            continue
        state = _read_state(store, f"{ROOT}/{name}")
        if state is not None:
            out.append(_checkpoint(store, f"{ROOT}/{name}", state))
    return out


def latest(store: RunStorage) -> Checkpoint | None:
    found = complete_checkpoints(store)
    return found[-1] if found else None


def stored_config_yaml(cfg: Config) -> str:
    """What a run directory's and a checkpoint's `config.yaml` hold: the resolved config, with the
    credentials of URIs masked (`redacted`). A resume compares URIs masked on both sides and
    reads them, credentials included, from the config it is given, never from the file."""
    return yaml.safe_dump(
        redacted_values(config_to_dict(cfg)), sort_keys=False, default_flow_style=False
    )


def saved_config(store: RunStorage, rel: str) -> Config:
    """The config stored at `rel` (a YAML file in the run directory)."""
    return config_from_dict(parse_yaml(store.read_text(rel), rel), source=rel)


# Keys that, changed, make a checkpoint meaningless or unloadable, or change what is trained.
# model.student_path and model.teacher_path: _model_changes.
_BREAKING = {
    "model.dtype": "the optimizer state was saved in another precision",
    "learner.num_workers": "DeepSpeed partitions the optimizer state by world size",
    "learner.zero_stage": "ZeRO stages store their state differently",
    "data.train_path": "the data position refers to another prompt file",
    "data.toy_prompts": "the data position refers to another prompt set",
    "data.seed": "the data position refers to another shuffle",
    "data.shuffle": "the data position refers to another order",
    "loss.name": "the rest of the run would train another objective",
    "loss.clip_eps": "the rest of the run would train another objective",
    "loss.entropy_threshold": "the rest of the run would train another objective",
    "loss.fkl_coef": "the rest of the run would train another objective",
    "loss.jsd_beta": "the rest of the run would train another objective",
}


def prompts_fingerprint(prompts: list[list[int]]) -> str:
    """sha256 of the kept prompts' token ids, in order: what the stream position indexes. Every
    data key (max_prompt_tokens, overlong_prompts, columns, suffix, templates, format) and the
    files' contents change it when they change the prompts."""
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(len(prompt).to_bytes(4, "little"))
        digest.update(torch.tensor(prompt, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def lr_schedule_shape(cfg: Config) -> dict:
    """What roles.learner_engine.lr_multiplier depends on; the run's length only for cosine."""
    lrn = cfg.learner
    return {
        "lr": lrn.lr,
        "lr_schedule": lrn.lr_schedule,
        "warmup_steps": lrn.warmup_steps,
        "min_lr_ratio": lrn.min_lr_ratio if lrn.lr_schedule == "cosine" else None,
        "total_updates": total_updates(cfg) if lrn.lr_schedule == "cosine" else None,
    }


def training_identity(cfg: Config, prompts: list[list[int]]) -> dict:
    """What a checkpoint records so that a resume trains on what the run trained on."""
    return {
        "prompts": {"count": len(prompts), "sha256": prompts_fingerprint(prompts)},
        "lr_schedule": lr_schedule_shape(cfg),
    }


def _identity_changes(saved: dict, now: dict) -> list[str]:
    out = []
    old, new = saved.get("prompts"), now["prompts"]
    if old is not None and old != new:
        out.append(
            f"the kept prompts differ ({old['count']} prompts then, {new['count']} now, or the "
            "same count with other contents): a data key (max_prompt_tokens, overlong_prompts, "
            "prompt_column, prompt_suffix, student_template, format) or the data files changed, "
            "so the saved data position would re-train some prompts and skip others"
        )
    old, new = saved.get("lr_schedule"), now["lr_schedule"]
    if old is not None and old != new:
        diff = ", ".join(
            f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new.get(k)
        )
        out.append(
            f"the learning-rate schedule moved ({diff}): run.steps, rollout.prompts_per_step, "
            "rollout.samples_per_prompt, learner.mini_batch_size or learner.lr* changed"
        )
    return out


def _model_changes(saved: Config, cfg: Config) -> tuple[list[str], list[str]]:
    """(fatal, changed) for the two models. Another student is fatal (the learner state is
    its); another teacher changes what is distilled. A URI whose objects changed since the
    checkpoint (another `#listing=` pin, eopd_ray.storage.sources), or a GGUF file of another
    sha256 (`#sha256=`, eopd_ray.storage.gguf_source), changes the weights loaded: never
    silently. A checkpoint from before URIs were pinned cannot tell: taken as the same."""
    fatal, changed = [], []
    for name in ("student_path", "teacher_path"):
        key = f"model.{name}"
        old, new = redacted(getattr(saved.model, name)), redacted(getattr(cfg.model, name))
        split = split_gguf_pin if is_gguf(new) else split_uri_pin
        (old_uri, old_pin), (new_uri, new_pin) = split(old), split(new)
        if old == new or (old_uri == new_uri and old_pin is None):
            continue
        if old_uri == new_uri and is_gguf(new):
            changed.append(
                f"{key}: the GGUF file {redacted(new_uri)!r} changed since the checkpoint "
                f"(sha256 {old_pin}, now {new_pin})"
            )
        elif old_uri == new_uri:
            changed.append(
                f"{key}: the objects at {redacted(new_uri)!r} changed since the checkpoint "
                f"(listing {old_pin}, now {new_pin}: a file added, removed, resized or rewritten)"
            )
        elif name == "student_path":
            fatal.append(
                f"{key} changed from {redacted(old)!r} to {redacted(new)!r} (the learner state "
                "belongs to another student)"
            )
        else:
            changed.append(
                f"{key} changed from {redacted(old)!r} to {redacted(new)!r} (the rest of the run "
                "would distill another teacher)"
            )
    return fatal, changed


def check_compatible(
    cfg: Config, ckpt: Checkpoint, store: RunStorage, trained_on: dict | None = None
) -> list[str]:
    """Refuse to resume when the config or the data changed in a way the checkpoint cannot
    follow or that changes what is trained. With `run.allow_config_change` the changes that
    only change what is trained are returned (to log and to show in the metrics) instead; the
    ones that make the checkpoint unloadable are always refused."""
    saved = saved_config(store, f"{ckpt.rel}/config.yaml")
    fatal, changed = _model_changes(saved, cfg)
    for key, why in _BREAKING.items():
        section, name = key.split(".")
        old, new = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
        old, new = redacted_values(old), redacted_values(new)  # the file's are masked
        if old != new:
            (changed if key.startswith("loss.") else fatal).append(
                f"{key} changed from {old!r} to {new!r} ({why})"
            )
    if trained_on is not None:
        if not ckpt.trained_on:
            log.warning(
                "%s was written before checkpoints recorded their prompts and LR schedule: "
                "cannot check that the resumed run trains on the same data",
                ckpt.uri,
            )
        else:
            changed += _identity_changes(ckpt.trained_on, trained_on)
    if fatal or (changed and not cfg.run.allow_config_change):
        hint = "" if fatal else ", or set run.allow_config_change=true to resume anyway"
        raise CheckpointError(
            f"cannot resume from {ckpt.uri}: " + "; ".join(fatal + changed) + ". Restore "
            "those keys (or files)" + hint + ", or start a fresh run with run.resume=never or "
            "another run.output_dir"
        )
    return changed


def rng_state() -> dict:
    """The driver's random states, as a checkpoint records them (JSON)."""
    return {"python": _jsonable(random.getstate()), "torch": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    random.setstate(_tupled(state["python"]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def restore_rng(ckpt: Checkpoint) -> None:
    set_rng_state(ckpt.rng)


def _jsonable(value):
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _tupled(value):
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
