"""The switches that change the data path, pairwise: every pair of settings of any two of them
is run by some whole-pipeline test, and each run here checks, at every step, the invariants a
dropped, duplicated or misaligned row would break.

A bug that lives in one combination (e.g. `learner.balance_tokens: false` with the streamed
step and two learners, which once trained rows on log pi_old = 0) hides from tests that vary one
switch at a time. Exhaustive is 2^9 runs; pairwise is the cases below together with the settings
the other e2e tests already run (`OTHER_RUNS`), checked by `test_the_runs_cover_every_pair`.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from eopd_ray.config import load_config
from eopd_ray.driver.pipeline import Pipeline
from eopd_ray.telemetry.step_metrics import read_jsonl

from .conftest import TINY, learner_old_logprobs, tiny_overrides

# Switch -> its two settings (index 0 and 1 in the rows below).
SWITCHES = {
    "rollout.stream": (False, True),
    "rollout.async_lag": (0, 1),
    "learner.balance_tokens": (False, True),
    "learner.old_logprobs": ("recompute", "sampler"),
    "sync.transport": ("collective", "object_store"),
    "learner.zero_stage": (2, 3),
    "loss.fused_head": (False, True),
    "micro_batches": ("count", "budget"),  # learner.micro_batch_size / max_tokens_per_micro_batch
    "workers": (1, 2),  # rollout and learner workers (several ranks per role)
}

# What the other whole-pipeline runs set (tiny.yaml defaults unless they override): their own
# checks plus the run-time invariants every run applies.
OTHER_RUNS = {
    "test_pipeline streamed vs sync (ZeRO-3)": (1, 0, 1, 0, 0, 1, 1, 0, 1),
    "test_pipeline weight sync / learning / resume (defaults)": (1, 0, 1, 0, 0, 0, 1, 0, 1),
    "test_pipeline async rollout": (1, 1, 1, 1, 0, 0, 1, 0, 1),
    "test_reliability lost workers (sync, ZeRO-3)": (0, 0, 1, 0, 0, 1, 1, 0, 1),
    "test_faults_between_calls (sync)": (0, 0, 1, 0, 0, 0, 1, 0, 1),
}

# The cases this file runs (a greedy pairwise completion of OTHER_RUNS). The first is the
# combination that once dropped rows: streamed, no token balancing, 2 learners, odd groups.
CASES = [
    (1, 0, 0, 0, 1, 1, 0, 1, 1),
    (0, 1, 0, 1, 1, 0, 1, 1, 0),
    (1, 1, 1, 1, 0, 1, 0, 1, 0),
    (0, 0, 1, 1, 1, 0, 0, 0, 0),
    (1, 0, 0, 0, 0, 1, 1, 0, 0),
]


def _allowed(row) -> bool:
    """rollout.async_lag: 1 needs learner.old_logprobs: sampler (a config rule)."""
    return not (row[1] == 1 and row[3] == 0)


def _settings(row) -> dict:
    return {name: levels[bit] for (name, levels), bit in zip(SWITCHES.items(), row, strict=True)}


def _name(row) -> str:
    s = _settings(row)
    return "-".join(
        [
            "stream" if s["rollout.stream"] else "sync",
            f"lag{s['rollout.async_lag']}",
            "balanced" if s["learner.balance_tokens"] else "blocks",
            s["learner.old_logprobs"],
            s["sync.transport"],
            f"zero{s['learner.zero_stage']}",
            "fused" if s["loss.fused_head"] else "plain",
            s["micro_batches"],
            f"x{s['workers']}",
        ]
    )


def test_the_runs_cover_every_pair():
    runs = [*OTHER_RUNS.values(), *CASES]
    assert all(_allowed(r) and len(r) == len(SWITCHES) for r in runs)
    for i, j in itertools.combinations(range(len(SWITCHES)), 2):
        for a, b in itertools.product((0, 1), repeat=2):
            row = [0] * len(SWITCHES)
            row[i], row[j] = a, b
            if (i, j) == (1, 3) and not _allowed(row):
                continue
            assert any(r[i] == a and r[j] == b for r in runs), (
                f"no run sets {list(SWITCHES)[i]}={SWITCHES[list(SWITCHES)[i]][a]} with "
                f"{list(SWITCHES)[j]}={SWITCHES[list(SWITCHES)[j]][b]}"
            )


def _overrides(row) -> list[str]:
    s = _settings(row)
    out = [
        "run.steps=2",
        "run.export_hf=false",
        # 12 rows a step; streamed groups of >= 8 tokens: small groups of odd sizes.
        "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=3",
        "rollout.stream_group_tokens=8",
        "learner.mini_batch_size=6",  # 2 updates a step
        "teacher.num_workers=1",
        f"rollout.num_workers={s['workers']}",
        f"learner.num_workers={s['workers']}",
    ]
    out += [f"{k}={str(v).lower()}" for k, v in s.items() if "." in k]
    if s["micro_batches"] == "count":
        out.append("learner.micro_batch_size=3")
    else:
        out += ["learner.micro_batch_size=1", "learner.max_tokens_per_micro_batch=256"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("row", CASES, ids=_name)
def test_every_row_trained_once_with_its_own_scores_and_pi_old(local_ray, tiny_pair, tmp_path, row):
    out = tmp_path / "run"
    cfg = load_config(TINY, tiny_overrides(tiny_pair, out, *_overrides(row)))
    pipeline = Pipeline(cfg)
    train = pipeline._train
    seen: list[dict] = []

    def checked_train(batch, scores, step, shares, recompute=None, old=None):
        n = batch.num_sequences
        assert n == cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
        # Every row once over ranks and updates.
        rows = sorted(r for rank_rows, _ in shares.ranks for r in rank_rows)
        assert rows == list(range(n)), rows
        # Rows in the synchronous order: prompt-major per rollout worker, the step's prompts.
        per_prompt = batch.prompt_index.view(-1, cfg.rollout.samples_per_prompt)
        assert (per_prompt == per_prompt[:, :1]).all()
        # The scores are this batch's, row by row: the teacher scoring the assembled batch
        # again gives the same numbers.
        again = pipeline._score(batch, step)
        for name in ("token_logprobs", "entropy", "topk_logprobs"):
            torch.testing.assert_close(
                getattr(scores, name), getattr(again, name), atol=1e-5, rtol=1e-5
            )
        # pi_old: what the learners hold now recomputes the streamed pi_old, and matches the
        # sampler's log-probs when they hold the weights that sampled (on-policy).
        on_policy = batch.weight_version == pipeline.version
        reference = learner_old_logprobs(pipeline, batch, shares)
        if old is not None:
            assert on_policy
            torch.testing.assert_close(old, reference, atol=1e-5, rtol=1e-5)
        mask = batch.response_mask
        gap = (batch.sampler_logprobs - reference)[mask].abs().mean().item()
        if on_policy:
            assert gap < 1e-3, gap
        seen.append({"step": step, "rows": n, "version": batch.weight_version, "gap": gap})
        return train(batch, scores, step, shares, recompute, old)

    pipeline._train = checked_train
    try:
        pipeline.start()
        history = pipeline.run(progress="lines")
    finally:
        pipeline.shutdown()
    assert [s["step"] for s in seen] == [0, 1]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1]
    lag = cfg.rollout.async_lag
    assert [h["rollout/weight_version"] for h in history] == [0, 1 - lag]
    assert pipeline.version == 2
    assert all(h["opd/sampler_gap"] < 1e-3 for h in history if h["rollout/version_lag"] == 0)
    print(_name(row), seen)
