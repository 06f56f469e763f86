"""Rules spanning several config keys, one function each, named for what must hold.

    @rule("learner.mini_batch_size", reads=("rollout.prompts_per_step", ...))
    def mini_batch_divides_the_step(cfg): ...  # None when it holds, else what is wrong

Each rule names the key the user should change (where the issue is reported) and the keys it
reads: a rule is skipped when one of those already has a type error, so one mistake is not
reported twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from eopd_ray.config.schema import Config, total_updates
from eopd_ray.errors import ConfigIssue


@dataclass(frozen=True)
class Rule:
    path: str  # the key to change, where the issue is reported
    reads: tuple[str, ...]
    check: Callable[[Config], str | None]  # None: holds; else the message


RULES: list[Rule] = []


def rule(path: str, reads: tuple[str, ...] = ()) -> Callable:
    def register(check: Callable[[Config], str | None]) -> Callable[[Config], str | None]:
        RULES.append(Rule(path, reads or (path,), check))
        return check

    return register


def cross_field_issues(cfg: Config, skip: Iterable[str] = ()) -> list[ConfigIssue]:
    """Every broken rule, except those reading a key under one of `skip` (already reported)."""
    skip = set(skip)
    issues = []
    for r in RULES:
        if any(k == b or k.startswith(b + ".") for k in r.reads for b in skip):
            continue
        message = r.check(cfg)
        if message is not None:
            issues.append(ConfigIssue(r.path, message))
    return issues


# ----------------------------------------------------------------------------- models


@rule("model.student_path")
def the_student_is_given(cfg: Config) -> str | None:
    if not cfg.model.student_path:
        return (
            "required: the student as a HF model directory, a hub id (org/name[@revision]) or a URI"
        )
    return None


@rule("model.teacher_path")
def the_teacher_is_given(cfg: Config) -> str | None:
    if not cfg.model.teacher_path:
        return (
            "required: the teacher as a HF model directory, a hub id (org/name[@revision]) or a URI"
        )
    return None


@rule(
    "model.build_rehearsal", reads=("model.build_tiny", "model.build_rehearsal", "model.build_toy")
)
def at_most_one_model_builder(cfg: Config) -> str | None:
    m = cfg.model
    if m.build_tiny + m.build_rehearsal + m.build_toy > 1:
        return "set at most one of model.build_tiny, model.build_rehearsal and model.build_toy"
    return None


@rule(
    "model.build_toy",
    reads=("model.build_toy", "model.student_path", "model.teacher_path", "data.train_path"),
)
def toy_paths_follow_the_prepared_layout(cfg: Config) -> str | None:
    m = cfg.model
    root = m.student_path.removesuffix("/current/student")
    if not m.build_toy or (
        m.student_path.endswith("/current/student")
        and m.teacher_path == f"{root}/current/teacher"
        and cfg.data.train_path == f"{root}/current/train.jsonl"
    ):
        return None
    return (
        "needs model.student_path = <root>/current/student, model.teacher_path = "
        "<root>/current/teacher and data.train_path = <root>/current/train.jsonl (the layout "
        "jobs/prepare_toy.py writes); to train other models (a hub id, a URI, a directory of "
        "yours) set model.build_toy=false"
    )


# ----------------------------------------------------------------------------- batch shapes


@rule(
    "learner.mini_batch_size",
    reads=("rollout.prompts_per_step", "rollout.samples_per_prompt", "learner.mini_batch_size"),
)
def mini_batch_divides_the_step(cfg: Config) -> str | None:
    r, mini = cfg.rollout, cfg.learner.mini_batch_size
    seqs = r.prompts_per_step * r.samples_per_prompt
    if seqs % mini == 0:
        return None
    return (
        f"must divide the sequences per step (rollout.prompts_per_step * "
        f"rollout.samples_per_prompt = {seqs}); got {mini}"
    )


@rule("learner.mini_batch_size", reads=("learner.mini_batch_size", "learner.num_workers"))
def ranks_share_the_mini_batch_evenly(cfg: Config) -> str | None:
    lrn = cfg.learner
    if lrn.mini_batch_size % lrn.num_workers == 0:
        return None
    return (
        f"must be a multiple of learner.num_workers ({lrn.num_workers}); got {lrn.mini_batch_size}"
    )


@rule(
    "learner.micro_batch_size",
    reads=("learner.mini_batch_size", "learner.num_workers", "learner.micro_batch_size"),
)
def micro_batch_divides_a_ranks_share(cfg: Config) -> str | None:
    lrn = cfg.learner
    per_rank = lrn.mini_batch_size // lrn.num_workers
    if per_rank == 0 or per_rank % lrn.micro_batch_size == 0:
        return None
    return (
        f"must divide the per-rank mini-batch (learner.mini_batch_size / learner.num_workers = "
        f"{per_rank}); got {lrn.micro_batch_size}"
    )


@rule("rollout.num_workers", reads=("rollout.prompts_per_step", "rollout.num_workers"))
def every_rollout_worker_gets_a_prompt(cfg: Config) -> str | None:
    r = cfg.rollout
    if r.prompts_per_step >= r.num_workers:
        return None
    return (
        f"more rollout workers ({r.num_workers}) than prompts per step "
        f"({r.prompts_per_step}): lower it or raise rollout.prompts_per_step"
    )


@rule(
    "rollout.max_model_len",
    reads=("rollout.max_new_tokens", "rollout.max_model_len", "data.max_prompt_tokens"),
)
def prompt_and_response_fit_the_engine(cfg: Config) -> str | None:
    r, prompt = cfg.rollout, cfg.data.max_prompt_tokens
    if prompt + r.max_new_tokens <= r.max_model_len:
        return None
    return (
        f"must hold data.max_prompt_tokens + rollout.max_new_tokens "
        f"({prompt} + {r.max_new_tokens}); got {r.max_model_len}"
    )


# ----------------------------------------------------------------------------- on-policy sampling


@rule("rollout.top_p")
def training_samples_the_full_vocabulary(cfg: Config) -> str | None:
    if cfg.rollout.top_p == 1.0:
        return None
    return (
        f"must be 1.0 for training; got {cfg.rollout.top_p}. The sampler's, the learner's and "
        "the teacher's log-probs are all over the full (tempered) vocabulary, so sampling from "
        "a truncated nucleus would make the ratio r_t and the advantage A_t wrong; "
        "evaluation has its own eval.top_p"
    )


@rule("learner.old_logprobs", reads=("rollout.async_lag", "learner.old_logprobs"))
def stale_samples_keep_the_samplers_logprobs(cfg: Config) -> str | None:
    if cfg.rollout.async_lag == 0 or cfg.learner.old_logprobs == "sampler":
        return None
    return (
        "must be sampler when rollout.async_lag > 0: the samples come from older weights than "
        "the learner's, so pi_old is the sampler's log-probs, not a recomputation"
    )


# ----------------------------------------------------------------------------- prompts and teacher


@rule("teacher.serve")
def a_served_teacher_is_named(cfg: Config) -> str | None:
    if cfg.teacher.serve is None or cfg.teacher.serve.strip():
        return None
    return "empty: the name of a running teacher application (jobs/serve_teacher.py), or unset"


@rule("data.train_path", reads=("data.train_path", "data.toy_prompts"))
def exactly_one_prompt_source(cfg: Config) -> str | None:
    d = cfg.data
    if bool(d.train_path) != (d.toy_prompts > 0):
        return None
    return "set exactly one of data.train_path (a prompt file) and data.toy_prompts (> 0)"


@rule("data.teacher_template", reads=("data.student_template", "data.teacher_template"))
def teacher_re_renders_a_raw_prompt(cfg: Config) -> str | None:
    d = cfg.data
    if d.teacher_template == d.student_template or d.student_template == "raw":
        return None
    return (
        "a teacher template different from the student's needs data.student_template: raw "
        "(the teacher re-renders the student's raw prompt)"
    )


@rule(
    "teacher.teacher_eos_token_id",
    reads=("teacher.student_eos_token_id", "teacher.teacher_eos_token_id"),
)
def eos_ids_are_mapped_in_pairs(cfg: Config) -> str | None:
    t = cfg.teacher
    if (t.student_eos_token_id is None) == (t.teacher_eos_token_id is None):
        return None
    return (
        "teacher.student_eos_token_id and teacher.teacher_eos_token_id are set together or not "
        "at all"
    )


# ----------------------------------------------------------------------------- evaluation, schedule


@rule("eval.k", reads=("eval.k", "eval.samples_per_problem"))
def k_is_at_most_the_samples(cfg: Config) -> str | None:
    e = cfg.eval
    if e.k <= e.samples_per_problem:
        return None
    return f"must not exceed eval.samples_per_problem ({e.samples_per_problem}); got {e.k}"


@rule(
    "eval.max_new_tokens",
    reads=(
        "eval.every_steps",
        "eval.max_new_tokens",
        "data.max_prompt_tokens",
        "rollout.max_model_len",
    ),
)
def evaluation_fits_the_rollout_engine(cfg: Config) -> str | None:
    e, prompt, engine_len = cfg.eval, cfg.data.max_prompt_tokens, cfg.rollout.max_model_len
    if e.every_steps == 0 or prompt + e.max_new_tokens <= engine_len:
        return None
    return (
        f"evaluation during training runs on the rollout engines: data.max_prompt_tokens + "
        f"eval.max_new_tokens ({prompt} + {e.max_new_tokens}) must "
        f"fit rollout.max_model_len ({engine_len}); lower it or raise rollout.max_model_len"
    )


@rule("eval.benchmarks", reads=("eval.every_steps", "eval.source", "eval.benchmarks"))
def benchmark_evaluation_has_benchmarks(cfg: Config) -> str | None:
    e = cfg.eval
    if e.every_steps == 0 or e.source != "benchmarks" or e.benchmarks:
        return None
    return "eval.source: benchmarks needs at least one benchmark JSONL file in eval.benchmarks"


@rule("eval.short_answer_path", reads=("eval.every_steps", "eval.source", "eval.short_answer_path"))
def short_answer_evaluation_has_questions(cfg: Config) -> str | None:
    e = cfg.eval
    if e.every_steps == 0 or e.source != "short_answer" or e.short_answer_path:
        return None
    return (
        "eval.source: short_answer needs a question file (JSONL of prompt, answers, rivals) in "
        "eval.short_answer_path, e.g. the one `jobs/real_task.py prepare` writes"
    )


@rule("eval.source", reads=("eval.every_steps", "eval.source", "data.toy_prompts"))
def arithmetic_evaluation_has_synthetic_prompts(cfg: Config) -> str | None:
    e = cfg.eval
    if e.every_steps == 0 or e.source != "arithmetic" or cfg.data.toy_prompts > 0:
        return None
    return (
        "arithmetic held-out prompts are a slice of the synthetic ones: needs data.toy_prompts > 0"
    )


@rule("learner.warmup_steps", reads=("learner.warmup_steps", "run.steps"))
def warmup_fits_in_the_run(cfg: Config) -> str | None:
    updates, warmup = total_updates(cfg), cfg.learner.warmup_steps
    if warmup <= updates:
        return None
    return f"longer than the whole run ({updates} optimizer updates); got {warmup}"


# ----------------------------------------------------------------------------- checkpoints


@rule("run.checkpoint_every_s")
def checkpoint_interval_is_a_duration(cfg: Config) -> str | None:
    every_s = cfg.run.checkpoint_every_s
    if math.isfinite(every_s) and every_s >= 0:
        return None
    return (
        "seconds between time-based checkpoints: must be finite and >= 0 (0 turns them off; "
        f"run.checkpoint_every counts steps instead); got {every_s}"
    )
