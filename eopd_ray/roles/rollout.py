"""RolloutWorker: samples responses from the student and loads new student weights.

The engines it holds (vLLM, or the transformers reference), what they sample and the seeds of
each request are eopd_ray/roles/rollout_engines.py; this module is the worker around them:
batching the samples, streaming them as they finish, and the weight-sync protocol.

The worker is a plain class; workers.py makes it a Ray actor. Weight versions: the worker starts
at version 0 (the student checkpoint on disk) and every load reports the new version, which each
RolloutBatch then carries.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import torch

from eopd_ray.config import Config
from eopd_ray.core.wire import RolloutBatch
from eopd_ray.errors import WorkerReplaced
from eopd_ray.roles.cancellation import cancelled
from eopd_ray.roles.rollout_engines import ENGINES, Finished, Sample, Sampling
from eopd_ray.roles.weight_sync import RetiredGroups, WeightReceiver
from eopd_ray.startup_heap import built_with_collector_paused
from eopd_ray.storage.sources import with_local_models
from eopd_ray.telemetry.ray_gauges import WorkerMetrics


class RolloutWorker:
    """Holds a student engine; samples responses and loads new weights (one Ray actor each)."""

    @built_with_collector_paused  # a third less CPU to start (eopd_ray.startup_heap)
    def __init__(self, cfg: Config, rank: int) -> None:
        cfg = with_local_models(cfg)  # hub ids and URIs: downloaded once per node
        self.cfg, self.rank = cfg, rank
        self.engine = ENGINES[cfg.rollout.engine](cfg, seed=cfg.rollout.seed + rank)
        self.version = 0
        self._pending: tuple[int, int] | None = None  # (version, checksum) loaded, unconfirmed
        self.receiver: WeightReceiver | None = None
        self._retired_groups = RetiredGroups()  # see there: why groups are never destroyed
        self.metrics = WorkerMetrics("rollout", rank, cfg.run.id)

    def generate(
        self,
        prompts: list[list[int]],
        prompt_index: list[int],
        seeds: list[int],
        sampling: Sampling | None = None,
    ) -> RolloutBatch:
        """Sample responses to `prompts` with the current weights (`sampling` defaults to the
        config's `rollout.*`); `seeds[i]` is prompt i's seed (see `prompt_seeds`). Rows are
        prompt-major: all samples of prompt 0, then prompt 1..."""
        started = time.perf_counter()
        per_prompt = self.engine.generate(
            prompts, sampling or Sampling.from_config(self.cfg), seeds
        )
        rows = [
            (p, i, s)
            for p, i, ss in zip(prompts, prompt_index, per_prompt, strict=True)
            for s in ss
        ]
        batch = self._batch(rows)
        self.metrics.throughput("rollout", batch.num_response_tokens, started)
        return batch

    def generate_stream(
        self,
        prompts: list[list[int]],
        prompt_index: list[int],
        seeds: list[int],
        rows: list[int] | None = None,
        group_tokens: int = 1,
    ) -> Iterator[tuple[list[int], RolloutBatch, float, float]]:
        """`generate` as a stream (call it with num_returns="streaming"): yields
        (rows, batch of those rows, started, now) as soon as the finished responses not yet
        handed out hold at least `group_tokens` response tokens, and the rest at the end. A row
        is prompt * samples_per_prompt + sample, as in `generate`'s batch; `rows` (default all)
        picks which to generate (a redo after a worker was lost). Times are wall-clock seconds
        (time.time) for the driver's step timeline."""
        started, wall_started = time.perf_counter(), time.time()
        sampling = Sampling.from_config(self.cfg)
        n = sampling.samples_per_prompt
        held: list[Finished] = []
        tokens = 0

        def group() -> tuple[list[int], RolloutBatch, float, float]:
            batch = self._batch([(prompts[r // n], prompt_index[r // n], s) for r, s in held])
            return [r for r, _ in held], batch, wall_started, time.time()

        for finished in self.engine.finished(prompts, sampling, seeds, rows):
            held += finished
            tokens += sum(len(s.response_ids) for _, s in finished)
            if tokens >= group_tokens:
                self.metrics.throughput("rollout", tokens, started)
                yield group()
                held, tokens, started = [], 0, time.perf_counter()
        if held:
            self.metrics.throughput("rollout", tokens, started)
            yield group()

    def _batch(self, rows: list[tuple[list[int], int, Sample]]) -> RolloutBatch:
        """(prompt, its index in the data stream, sample) per row, as one padded batch."""
        b = len(rows)
        p_len = max(len(p) for p, _, _ in rows)
        t_len = max(1, max(len(s.response_ids) for _, _, s in rows))
        prompt_ids = torch.zeros(b, p_len, dtype=torch.int64)
        prompt_mask = torch.zeros(b, p_len, dtype=torch.bool)
        response_ids = torch.zeros(b, t_len, dtype=torch.int64)
        response_mask = torch.zeros(b, t_len, dtype=torch.bool)
        logprobs = torch.zeros(b, t_len, dtype=torch.float32)
        for row, (prompt, _, sample) in enumerate(rows):
            n = len(sample.response_ids)
            prompt_ids[row, : len(prompt)] = torch.tensor(prompt)
            prompt_mask[row, : len(prompt)] = True
            response_ids[row, :n] = torch.tensor(sample.response_ids, dtype=torch.int64)
            response_mask[row, :n] = True
            logprobs[row, :n] = torch.tensor(sample.logprobs, dtype=torch.float32)
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            sampler_logprobs=logprobs,
            prompt_index=torch.tensor([i for _, i, _ in rows], dtype=torch.int64),
            finish_reason=tuple(s.finish_reason for _, _, s in rows),
            weight_version=self.version,
        )

    # --- weight sync ---------------------------------------------------------------------------

    def join_sync_group(self, address: str, port: int, world_size: int, metadata: list) -> None:
        """Join the collective group learner rank 0 broadcasts weights on (rank = 1 + self.rank)."""
        self._retired_groups.retire(self.receiver)
        self.receiver = WeightReceiver.connect(
            address, port, 1 + self.rank, world_size, metadata, self.cfg.sync.timeout_s
        )

    def receive_weights(self, version: int) -> tuple[int, dict[str, float]]:
        """Receive every bucket of version `version` over the collective group and load them
        as one weight update; returns the checksum read back from the engine and the seconds
        spent (`_loaded`). The worker's version changes only when the driver confirms that
        checksum (`confirm_weights`)."""
        if self.receiver is None:
            raise WorkerReplaced(
                f"rollout-{self.rank} (pid {os.getpid()}) has not joined the weight-sync group: "
                "it was restarted since the group formed; the driver rejoins it and syncs again"
            )
        started, receiving = time.perf_counter(), [0.0]
        buckets = _time_waiting(self.receiver.receive(should_stop=cancelled), receiving)
        cache_reset_s = self.engine.load_weights(buckets, version)
        return self._loaded(version, started, receiving[0], cache_reset_s)

    def load_weights(
        self, buckets: list[list[tuple[str, torch.Tensor]]], version: int
    ) -> tuple[int, dict[str, float]]:
        """Object-store transport: the buckets arrive as this call's argument (received before
        the call starts: `receive_s` 0)."""
        started = time.perf_counter()
        cache_reset_s = self.engine.load_weights(buckets, version)
        return self._loaded(version, started, 0.0, cache_reset_s)

    def _loaded(
        self, version: int, started: float, receive_s: float, cache_reset_s: float
    ) -> tuple[int, dict[str, float]]:
        """Checksum what the engine now holds (pending until confirmed); the seconds of each
        part: `load_s` (from the first bucket asked for to the engine ready) = `receive_s`
        (waiting for and receiving the buckets) + `reload_s` (vLLM's weight update) +
        `cache_reset_s` (the prefix-cache reset); then `checksum_s` (reading the engine back)."""
        loaded = time.perf_counter()
        self._pending = (version, self.engine.weights_checksum())
        load_s = loaded - started
        times = {
            "load_s": load_s,
            "receive_s": receive_s,
            "reload_s": load_s - receive_s - cache_reset_s,
            "cache_reset_s": cache_reset_s,
            "checksum_s": time.perf_counter() - loaded,
        }
        return self._pending[1], times

    def confirm_weights(self, version: int, learner_checksum: int) -> tuple[int, int | None]:
        """Take `version` as the engine's weight version if what the engine holds is what the
        learner sent (`learner_checksum`). Returns (the version now, the checksum loaded)."""
        pending, self._pending = self._pending, None
        if pending is not None and pending == (version, learner_checksum):
            self.version = version
        return self.version, pending[1] if pending and pending[0] == version else None

    def token_logprobs(self, ids: list[int]) -> tuple[int, list[float]]:
        """(weight version, log p(ids[j] | ids[:j]) for j >= 1 at temperature 1): the probe the
        driver compares with the learner's after every weight sync."""
        return self.version, self.engine.token_logprobs(ids)


def _time_waiting(items: Iterator, spent: list[float]) -> Iterator:
    """`items` as they come, adding the seconds spent waiting for each (and for the end) to
    `spent[0]`: how long a load waited on the transfer rather than the engine."""
    items = iter(items)
    while True:
        started = time.perf_counter()
        try:
            item = next(items)
        except StopIteration:
            return
        finally:
            spent[0] += time.perf_counter() - started
        yield item
