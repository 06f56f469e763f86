"""core.invariants: sane teacher scores pass; each violation names the step, the worker, the
first offending row and position, the value and a likely cause; padding is never looked at."""

from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch

from eopd_ray.core.invariants import InvariantError, check_teacher_scores
from eopd_ray.core.wire import RolloutBatch, TeacherScores
from eopd_ray.errors import EopdError

V, K = 50, 4


def batch_and_scores(b: int = 3, t: int = 5, seed: int = 0) -> tuple[RolloutBatch, TeacherScores]:
    """Scores of a random softmax over V ids; the last position of every row is padding."""
    g = torch.Generator().manual_seed(seed)
    rm = torch.ones(b, t, dtype=torch.bool)
    rm[:, -1] = False
    batch = RolloutBatch(
        prompt_ids=torch.ones(b, 2, dtype=torch.int64),
        prompt_mask=torch.ones(b, 2, dtype=torch.bool),
        response_ids=torch.randint(0, V, (b, t), generator=g) * rm,
        response_mask=rm,
        sampler_logprobs=torch.zeros(b, t),
        prompt_index=torch.arange(b),
        finish_reason=("stop",) * b,
        weight_version=0,
    )
    logp = torch.log_softmax(3 * torch.randn(b, t, V, generator=g), -1)  # (B, T, V)
    top = logp.topk(K, -1)
    scores = TeacherScores(
        token_logprobs=logp.gather(-1, batch.response_ids[..., None])[..., 0],
        entropy=-(logp.exp() * logp).sum(-1),
        topk_ids=top.indices.to(torch.int32),
        topk_logprobs=top.values,
    )
    return batch, scores


def edited(scores: TeacherScores, field: str, index: tuple[int, ...], value: float):
    tensor = getattr(scores, field).clone()
    tensor[index] = value
    return dataclasses.replace(scores, **{field: tensor})


def test_sane_scores_pass_and_padding_is_ignored():
    batch, scores = batch_and_scores()
    check_teacher_scores(scores, batch, vocab_size=V, step=3, worker="teacher[0]")
    # Garbage at padding (position 4) does not count.
    for field, index in (
        ("entropy", (1, 4)),
        ("token_logprobs", (0, 4)),
        ("topk_logprobs", (2, 4, 1)),
    ):
        scores = edited(scores, field, index, math.nan)
    scores = edited(scores, "topk_logprobs", (2, 4, 3), 5.0)
    check_teacher_scores(scores, batch, vocab_size=V, step=3, worker="teacher[0]")
    # A uniform teacher sits exactly at ln(V) and passes.
    uniform = torch.full((3, 5), math.log(V))
    check_teacher_scores(dataclasses.replace(scores, entropy=uniform), batch, V, 3, "teacher[0]")


@pytest.mark.parametrize(
    "field, index, value, check, cause",
    [
        ("entropy", (1, 2), math.nan, "non-finite entropy", "overflowed"),
        ("token_logprobs", (2, 0), -math.inf, "non-finite sampled-token log-prob", "overflowed"),
        ("topk_logprobs", (0, 3, 2), math.inf, "non-finite top-k log-prob", "overflowed"),
        ("entropy", (2, 1), -0.01, "negative entropy", "low precision"),
        ("entropy", (0, 2), math.log(V) + 0.01, "entropy above ln(vocab_size = 50)", "wrong"),
        ("token_logprobs", (1, 3), 0.5, "sampled-token log-prob above 0", "not normalized"),
        ("topk_logprobs", (2, 2, 0), 0.01, "top-k log-prob above 0", "not normalized"),
    ],
)
def test_each_violation_names_step_worker_place_value_and_cause(field, index, value, check, cause):
    batch, scores = batch_and_scores()
    bad = edited(scores, field, index, value)
    with pytest.raises(InvariantError) as exc:
        check_teacher_scores(bad, batch, vocab_size=V, step=17, worker="teacher[1]")
    err = exc.value
    assert isinstance(err, EopdError)
    assert err.check.startswith(check) and (err.step, err.worker) == (17, "teacher[1]")
    assert err.where.startswith(f"row {index[0]}, position {index[1]}")
    message = str(err)
    assert message.startswith("step 17, teacher[1]: ") and check in message
    assert f"row {index[0]}, position {index[1]}" in message and cause in message
    assert f"(value {value:.6g})" in message
    assert err.value == pytest.approx(value, rel=1e-6, nan_ok=True)


def test_the_first_offending_position_is_reported():
    batch, scores = batch_and_scores()
    bad = edited(edited(scores, "entropy", (2, 0), -1.0), "entropy", (1, 3), -2.0)
    with pytest.raises(InvariantError, match=r"row 1, position 3 \(value -2\)"):
        check_teacher_scores(bad, batch, V, 0, "teacher[0]")


def test_unsorted_top_k_names_the_slot_and_both_values():
    batch, scores = batch_and_scores()
    top = scores.topk_logprobs.clone()
    top[1, 2, [1, 2]] = top[1, 2, [2, 1]]  # swap two slots
    with pytest.raises(InvariantError) as exc:
        check_teacher_scores(dataclasses.replace(scores, topk_logprobs=top), batch, V, 5, "t[0]")
    assert exc.value.check == "top-k log-probs not sorted descending"
    assert exc.value.where == "row 1, position 2, top-k slot 2"
    assert "re-sorting" in str(exc.value)
    ties = scores.topk_logprobs.clone()
    ties[0, 0, :] = ties[0, 0, 0]  # equal values are sorted
    check_teacher_scores(dataclasses.replace(scores, topk_logprobs=ties), batch, V, 5, "t[0]")


def test_scores_of_another_batch_are_refused():
    batch, _ = batch_and_scores(b=3)
    _, other = batch_and_scores(b=2)
    with pytest.raises(InvariantError, match="do not cover the rollout batch"):
        check_teacher_scores(other, batch, V, 1, "teacher[0]")


def test_invariant_error_pickles_with_its_fields():
    err = InvariantError("negative entropy", 4, "teacher[0]", "row 0, position 1", -0.5, "why")
    clone = pickle.loads(pickle.dumps(err))
    assert str(clone) == str(err) and (clone.step, clone.value) == (4, -0.5)


def test_real_teacher_scores_pass(tiny_pair):
    """The TeacherWorker's own output satisfies every invariant (bf16 teacher, EOS merged)."""
    from transformers import AutoTokenizer

    from eopd_ray.config import config_from_dict
    from eopd_ray.roles.teacher import TeacherWorker

    tok = AutoTokenizer.from_pretrained(tiny_pair[0])
    cfg = config_from_dict(
        {
            "model": {
                "student_path": str(tiny_pair[0]),
                "teacher_path": str(tiny_pair[1]),
                "dtype": "bfloat16",
            },
            "data": {"toy_prompts": 8},
            "rollout": {"temperature": 0.7},
            "teacher": {
                "top_k": 8,
                "chunk_positions": 3,
                "student_eos_token_id": tok.eos_token_id,
                "teacher_eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
            },
        }
    )
    worker = TeacherWorker(cfg, 0)
    g = torch.Generator().manual_seed(0)
    rm = torch.arange(6)[None] < torch.tensor([6, 3])[:, None]
    ids = torch.randint(3, len(tok), (2, 6), generator=g) * rm
    ids[1, 2] = tok.eos_token_id
    batch = RolloutBatch(
        prompt_ids=torch.randint(3, len(tok), (2, 4), generator=g),
        prompt_mask=torch.ones(2, 4, dtype=torch.bool),
        response_ids=ids,
        response_mask=rm,
        sampler_logprobs=torch.zeros(2, 6),
        prompt_index=torch.arange(2),
        finish_reason=("length", "stop"),
        weight_version=0,
    )
    scores = worker.score(batch)
    check_teacher_scores(scores, batch, worker.vocab_rows, 0, "teacher[0]")
    with pytest.raises(InvariantError, match=r"own top-k|likelier than the top-1"):
        check_teacher_scores(shifted_top_k(scores), batch, worker.vocab_rows, 0, "teacher[0]")


def shifted_top_k(scores: TeacherScores) -> TeacherScores:
    """The authors' public code's misalignment: each position's top-K is the next position's."""
    return dataclasses.replace(
        scores,
        topk_ids=scores.topk_ids.roll(-1, dims=1),
        topk_logprobs=scores.topk_logprobs.roll(-1, dims=1),
    )


def test_a_top_k_one_position_off_its_entropy_is_caught():
    """Review finding 6: every field was sane on its own, so a shifted top-K passed."""
    batch, scores = batch_and_scores(b=64, t=17, seed=5)
    check_teacher_scores(scores, batch, vocab_size=V, step=2, worker="teacher[1]")
    with pytest.raises(InvariantError, match="entropy below the entropy of its own top-k") as err:
        check_teacher_scores(
            shifted_top_k(scores), batch, vocab_size=V, step=2, worker="teacher[1]"
        )
    assert "step 2, teacher[1]" in str(err.value) and "shifted by one" in str(err.value)
    # How often the rule sees it, position by position (the check stops at the first).
    from eopd_ray.core.invariants import TOPK_ENTROPY_SLACK

    shifted = shifted_top_k(scores)
    top = shifted.topk_logprobs.double()
    partial = -(top.exp() * top).sum(-1)
    valid = batch.response_mask.clone()
    valid[:, -2] = False  # the last real position took padding's top-K
    caught = (shifted.entropy.double() < partial - TOPK_ENTROPY_SLACK)[valid].float().mean()
    assert caught > 0.1, float(caught)  # 13% for these random softmaxes over 50 ids


def test_a_sampled_token_outside_the_top_k_cannot_beat_the_top_1():
    batch, scores = batch_and_scores()
    # a position whose top-1 leaves room below 0
    row, pos = next(
        (r, p) for r in range(3) for p in range(4) if scores.topk_logprobs[r, p, 0] < -0.5
    )
    outside = next(i for i in range(V) if i not in scores.topk_ids[row, pos].tolist())
    ids = batch.response_ids.clone()
    ids[row, pos] = outside
    batch = dataclasses.replace(batch, response_ids=ids)
    scores = edited(scores, "token_logprobs", (row, pos), -20.0)
    check_teacher_scores(scores, batch, vocab_size=V, step=0, worker="teacher[0]")
    top1 = scores.topk_logprobs[row, pos, 0].item()
    bad = edited(scores, "token_logprobs", (row, pos), top1 + 0.1)
    with pytest.raises(InvariantError, match="outside the top-k but likelier than the top-1"):
        check_teacher_scores(bad, batch, vocab_size=V, step=0, worker="teacher[0]")


# ----------------------------------------------------------------------------- weight sync


def test_weights_in_sync_passes_within_the_bound_and_names_the_stale_worker():
    from eopd_ray.core.invariants import WeightsOutOfSync, check_weights_in_sync

    learner = [-1.0, -2.0, -3.0]
    check_weights_in_sync(learner, [[-1.0, -2.0, -3.0000005]], ["rollout[0]"], 1e-3, "step 0")
    with pytest.raises(WeightsOutOfSync) as err:
        check_weights_in_sync(
            learner,
            [[-1.0, -2.0, -3.0], [-1.5, -2.0, -3.0]],
            ["rollout[0]", "rollout[1] (node 1.2.3.4)"],
            1e-3,
            "step 7",
        )
    assert "step 7 weight sync: " in str(err.value) and "rollout[1] (node 1.2.3.4)" in str(
        err.value
    )
    assert "0.1667" in str(err.value)  # the measured mean gap
    with pytest.raises(WeightsOutOfSync, match="nan"):
        check_weights_in_sync(learner, [[float("nan"), -2.0, -3.0]], ["rollout[0]"], 1.0, "s")


def test_weights_loaded_check_names_the_worker_that_holds_other_weights():
    from eopd_ray.core.invariants import WeightsOutOfSync, check_weights_loaded

    workers = ["rollout-0", "rollout-1 (node 10.0.0.7)"]
    check_weights_loaded(0xABC, [(3, 0xABC), (3, 0xABC)], workers, 3, "step 2")
    with pytest.raises(WeightsOutOfSync) as err:
        check_weights_loaded(0xABC, [(3, 0xABC), (2, 0xABD)], workers, 3, "step 2")
    message = str(err.value)
    assert "step 2 weight sync to version 3: rollout-1 (node 10.0.0.7)" in message
    assert "0000000000000abd" in message and "stays at weight version 2" in message
    with pytest.raises(WeightsOutOfSync, match="rollout-0 loaded nothing for this version"):
        check_weights_loaded(0xABC, [(2, None), (3, 0xABC)], workers, 3, "step 2")


def test_sampler_gap_check_catches_nan_and_large_gaps():
    from eopd_ray.core.invariants import WeightsOutOfSync, check_sampler_gap

    check_sampler_gap(2e-4, 1e-3, step=3, worker="learner[0]")
    with pytest.raises(WeightsOutOfSync, match=r"step 3, learner\[1\]: opd/sampler_gap = nan"):
        check_sampler_gap(float("nan"), 1e-3, step=3, worker="learner[1]")
    with pytest.raises(WeightsOutOfSync, match=r"0\.5 exceeds 0\.001.*No update"):
        check_sampler_gap(0.5, 1e-3, step=3, worker="learner[0]")


def test_gap_bound_follows_the_dtype_unless_set():
    from eopd_ray.config import config_from_dict
    from eopd_ray.core.invariants import logprob_gap_bound, probe_sequence

    base = {"model": {"student_path": "s", "teacher_path": "t"}, "data": {"toy_prompts": 4}}
    assert logprob_gap_bound(config_from_dict(base)) == 1e-3
    bf16 = config_from_dict(base, ["model.dtype=bfloat16"])
    assert logprob_gap_bound(bf16) == 0.25
    assert logprob_gap_bound(config_from_dict(base, ["sync.max_logprob_gap=0.2"])) == 0.2
    # The sampler gap has a bound of its own (review finding 7).
    from eopd_ray.core.invariants import sampler_gap_bound

    assert sampler_gap_bound(config_from_dict(base)) == 1e-3
    assert sampler_gap_bound(bf16) == 0.25
    sampler = config_from_dict(base, ["learner.max_sampler_gap=0.5", "sync.max_logprob_gap=0.2"])
    assert sampler_gap_bound(sampler) == 0.5
    assert probe_sequence([[1, 2], [3, 4, 5]], num_tokens=4) == [1, 2, 3, 4]
    with pytest.raises(Exception, match="fewer than 2 tokens"):
        probe_sequence([[1]])
