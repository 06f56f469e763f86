"""The run's checkpoints from the driver's side: resume, save, what they were trained on, export.

Part of `Pipeline` (its base class). A checkpoint is the learners' DeepSpeed state plus the
driver's (`eopd_ray.storage.checkpoint`): step, weight version, prompt-stream position, RNG.
"""

from __future__ import annotations

import logging

from eopd_ray.storage import checkpoint
from eopd_ray.storage.checkpoint import Checkpoint

log = logging.getLogger(__name__)


class RunCheckpoints:
    """Checkpoint, resume and export of `Pipeline` (see the module docstring)."""

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

    def save_checkpoint(self, step: int) -> Checkpoint:
        """An atomic checkpoint after `step` (every learner rank writes its DeepSpeed state)."""
        self.claim.check(f"checkpoint after step {step}")
        rel = checkpoint.begin(self.store, step)
        written = self.learner.get(
            self.learner.call_async("save_checkpoint", self.store, rel),
            self.cfg.run.step_timeout_s,
            f"checkpoint after step {step}",
        )
        # A prefetched rollout is not part of the state: a resumed run takes its prompts again.
        stream = self._prefetched.stream_state if self._prefetched else self.stream.state_dict()
        self.claim.check(f"checkpoint after step {step}")
        self.last_checkpoint = checkpoint.commit(
            self.store,
            rel,
            self.cfg,
            step,
            self.version,
            stream,
            learner_files=sorted({f for files in written for f in files}),
            trained_on=self.training_identity,
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
