"""The run's checkpoints from the driver's side: resume, save, what they were trained on, export.

Part of `Pipeline` (its base class). A checkpoint is the learners' DeepSpeed state plus the
driver's (`eopd_ray.storage.checkpoint`): step, weight version, prompt-stream position, RNG.
"""

from __future__ import annotations

import logging

from eopd_ray.errors import EopdError
from eopd_ray.storage import checkpoint
from eopd_ray.storage.checkpoint import Checkpoint
from eopd_ray.storage.learner_files import learner_file_sizes

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
    """Checkpoint, resume and export of `Pipeline` (see the module docstring)."""

    checkpoint_due = staticmethod(checkpoint_due)

    def _resume(self, ckpt: Checkpoint) -> None:
        """Continue from checkpoint `ckpt`: learner state on every rank, weights pushed to the
        rollout workers, data position, RNG, step and version."""
        self.config_changes = checkpoint.check_compatible(
            self.cfg, ckpt, self.store, self.training_identity
        )
        for change in self.config_changes:
            log.warning("resuming with run.allow_config_change: %s", change)
        timeout = self.cfg.run.step_timeout_s
        self.learner.get(
            self.learner.call_async("load_checkpoint", self.store, ckpt.rel),
            timeout,
            f"loading {ckpt.uri}",
        )
        self._push_weights(ckpt.weight_version, "resume")
        self.stream.load_state_dict(ckpt.stream)
        checkpoint.restore_rng(ckpt)
        self.start_step = ckpt.step + 1
        self.last_checkpoint = ckpt
        log.info(
            "resumed from %s: next step %d, weight version %d",
            ckpt.uri,
            self.start_step,
            self.version,
        )

    def save_checkpoint(self, step: int, wait: bool = True) -> Checkpoint | None:
        """An atomic checkpoint after `step` (every learner rank writes its DeepSpeed state).
        On an object store with `wait=False` the learners upload in the background while the
        next step runs, and the checkpoint is committed (`state.json`) once every rank's upload
        is through (`commit_uploaded_checkpoint`); returns None then. At most one upload is in
        flight: an earlier one is finished and committed first."""
        self.commit_uploaded_checkpoint(wait=True)
        self.claim.check(f"checkpoint after step {step}")
        rel = checkpoint.begin(self.store, step)
        background = not wait and not self.store.is_local
        written = self.learner.get(
            self.learner.call_async("save_checkpoint", self.store, rel, background),
            self.cfg.run.step_timeout_s,
            f"checkpoint after step {step}",
        )
        # A prefetched rollout is not part of the state: a resumed run takes its prompts again.
        stream = self._prefetched.stream_state if self._prefetched else self.stream.state_dict()
        self._uploading = (rel, step, self.version, stream, written, checkpoint.rng_state())
        if background:
            return None
        return self.commit_uploaded_checkpoint(wait=True)

    def commit_uploaded_checkpoint(self, wait: bool) -> Checkpoint | None:
        """Commit the checkpoint whose learner files are going up, once they all are: at once
        when `wait`, else only if every rank's upload has finished. A failed upload stops the
        run with its URI (nothing of it is marked complete), even while other ranks are still
        uploading: a rank reports its error once (`upload_state` then forgets it)."""
        if self._uploading is None:
            return None
        rel, step, version, stream, written, rng = self._uploading
        what = f"checkpoint after step {step} (upload)"
        timeout = self.cfg.run.step_timeout_s
        if wait:
            self.learner.get(self.learner.call_async("wait_uploaded"), timeout, what)
        else:
            states = self.learner.get(self.learner.call_async("upload_state"), timeout, what)
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
        self.claim.check(f"checkpoint after step {step}")
        self.last_checkpoint = checkpoint.commit(
            self.store,
            rel,
            self.cfg,
            step,
            version,
            stream,
            learner_files=learner_file_sizes(written),
            trained_on=self.training_identity,
            rng=rng,
        )
        return self.last_checkpoint

    @property
    def training_identity(self) -> dict:
        """The kept prompts and the LR schedule, recorded in every checkpoint."""
        if self._identity is None:
            self._identity = checkpoint.training_identity(self.cfg, self.prompts)
        return self._identity

    def export_hf(self) -> str:
        """The current student as a Hugging Face model in <run.output_dir>/hf; returns where."""
        self.learner.get(
            self.learner.call_async("export_hf", self.store, "hf"),
            self.cfg.run.step_timeout_s,
            "HF export",
        )
        return self.store.show("hf")
