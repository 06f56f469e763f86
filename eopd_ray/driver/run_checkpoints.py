"""The run's checkpoints from the driver's side: resume, save, upload, commit, export.

    checkpoints = RunCheckpoints(cfg, store, claim, groups, weights, state, prompts)
    checkpoints.resume(ckpt)          # learners load it, weights pushed, the run state restored
    checkpoints.save(step, wait)      # learners write, the driver commits state.json last
    checkpoints.commit_uploaded(wait) # a background upload's commit, once every rank is through

A checkpoint is the learners' DeepSpeed state plus the driver's (`RunState.to_save`: step, weight
version, prompt-stream position, RNG; eopd_ray.storage.checkpoint).
"""

from __future__ import annotations

import logging

from eopd_ray.config import Config
from eopd_ray.driver.run_state import RunState, SavedState
from eopd_ray.driver.weight_versions import WeightVersions
from eopd_ray.driver.worker_groups import WorkerGroups
from eopd_ray.errors import EopdError
from eopd_ray.storage import checkpoint
from eopd_ray.storage.checkpoint import Checkpoint
from eopd_ray.storage.learner_files import learner_file_sizes
from eopd_ray.storage.run_claim import RunClaim
from eopd_ray.storage.run_storage import RunStorage

log = logging.getLogger(__name__)

UNFAILED = ("none", "running", "done")  # LearnerWorker.upload_state; anything else is an error


def checkpoint_due(step: int, since_s: float, every: int, every_s: float) -> bool:
    """Whether the periodic cadence checkpoints after `step` (0-based), `since_s` seconds after
    the previous checkpoint (or the start of this run's loop): after every `every` steps
    (`run.checkpoint_every`), and after the first step that ends at least `every_s` seconds
    after the previous checkpoint (`run.checkpoint_every_s`). Either triggers; 0 turns one off.
    The last step and a SIGTERM checkpoint whatever this says."""
    by_steps = every > 0 and (step + 1) % every == 0
    by_time = every_s > 0 and since_s >= every_s
    return by_steps or by_time


class RunCheckpoints:
    """Checkpoint, resume and export of one run (see the module docstring)."""

    def __init__(
        self,
        cfg: Config,
        store: RunStorage,
        claim: RunClaim,
        groups: WorkerGroups,
        weights: WeightVersions,
        state: RunState,
        prompts: list[list[int]],
    ) -> None:
        self.cfg, self.store, self.claim = cfg, store, claim
        self.groups, self.weights, self.state, self.prompts = groups, weights, state, prompts
        # A checkpoint whose learner files are going up: (its directory, what the learners
        # wrote, the driver's part), committed once every rank's upload is through.
        self._uploading: tuple[str, list, SavedState] | None = None
        self._identity: dict | None = None

    def resume(self, ckpt: Checkpoint) -> list[str]:
        """Continue from checkpoint `ckpt`: learner state on every rank, weights pushed to the
        rollout workers, the run state restored (`RunState.restore`). Returns what changed
        since (run.allow_config_change)."""
        changes = checkpoint.check_compatible(self.cfg, ckpt, self.store, self.training_identity)
        for change in changes:
            log.warning("resuming with run.allow_config_change: %s", change)
        self.load_learners(ckpt)
        self.weights.push(ckpt.weight_version, "resume")
        self.state.restore(ckpt)
        log.info(
            "resumed from %s: next step %d, weight version %d",
            ckpt.uri,
            self.state.next_step,
            self.state.version,
        )
        return changes

    def load_learners(self, ckpt: Checkpoint) -> None:
        """Every learner rank loads its DeepSpeed state from `ckpt`."""
        learner = self.groups.learner
        learner.get(
            learner.call_async("load_checkpoint", self.store, ckpt.rel),
            self.cfg.run.step_timeout_s,
            f"loading {ckpt.uri}",
        )

    def save(self, step: int, wait: bool = True) -> Checkpoint | None:
        """An atomic checkpoint after `step` (every learner rank writes its DeepSpeed state).
        On an object store with `wait=False` the learners upload in the background while the
        next step runs, and the checkpoint is committed (`state.json`) once every rank's upload
        is through (`commit_uploaded`); returns None then. At most one upload is in flight: an
        earlier one is finished and committed first."""
        self.commit_uploaded(wait=True)
        self.claim.check(f"checkpoint after step {step}")
        rel = checkpoint.begin(self.store, step)
        background = not wait and not self.store.is_local
        learner = self.groups.learner
        written = learner.get(
            learner.call_async("save_checkpoint", self.store, rel, background),
            self.cfg.run.step_timeout_s,
            f"checkpoint after step {step}",
        )
        self._uploading = (rel, written, self.state.to_save(step))
        if background:
            return None
        return self.commit_uploaded(wait=True)

    def drop_upload(self) -> None:
        """Forget the checkpoint going up (a learner group lost: its files may be incomplete);
        it is never committed."""
        self._uploading = None

    def commit_uploaded(self, wait: bool) -> Checkpoint | None:
        """Commit the checkpoint whose learner files are going up, once they all are: at once
        when `wait`, else only if every rank's upload has finished. A failed upload stops the
        run with its URI (nothing of it is marked complete), even while other ranks are still
        uploading: a rank reports its error once (`upload_state` then forgets it)."""
        if self._uploading is None:
            return None
        rel, written, saved = self._uploading
        what = f"checkpoint after step {saved.step} (upload)"
        timeout = self.cfg.run.step_timeout_s
        learner = self.groups.learner
        if wait:
            learner.get(learner.call_async("wait_uploaded"), timeout, what)
        else:
            states = learner.get(learner.call_async("upload_state"), timeout, what)
            failed = [f"learner[{r}]: {s}" for r, s in enumerate(states) if s not in UNFAILED]
            if failed:
                self._uploading = None
                raise EopdError(
                    f"{what}: " + "; ".join(failed) + ". Nothing of it is marked complete: "
                    "the newest complete checkpoint stays the resume point (submit again)"
                )
            if "running" in states:
                return None
        self._uploading = None
        self.claim.check(f"checkpoint after step {saved.step}")
        self.state.last_checkpoint = checkpoint.commit(
            self.store,
            rel,
            self.cfg,
            saved.step,
            saved.weight_version,
            saved.stream,
            learner_files=learner_file_sizes(written),
            trained_on=self.training_identity,
            rng=saved.rng,
        )
        return self.state.last_checkpoint

    @property
    def training_identity(self) -> dict:
        """The kept prompts and the LR schedule, recorded in every checkpoint."""
        if self._identity is None:
            self._identity = checkpoint.training_identity(self.cfg, self.prompts)
        return self._identity

    def export_hf(self) -> str:
        """The current student as a Hugging Face model in <run.output_dir>/hf; returns where."""
        learner = self.groups.learner
        learner.get(
            learner.call_async("export_hf", self.store, "hf"),
            self.cfg.run.step_timeout_s,
            "HF export",
        )
        return self.store.show("hf")
