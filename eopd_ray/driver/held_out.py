"""Held-out prompts for evaluation during training, and how their answers are judged.

    held_out = load_held_out(cfg)                 # or None when eval.every_steps is 0
    args = held_out.requests(cfg.eval, workers)   # RolloutWorker.generate arguments per worker
    metrics = held_out.score(batch)               # the generated RolloutBatch, judged
    metrics["eval/avg@8"], metrics["eval/pass@8"]
    held_out.judge(completions)                   # the same from texts: completions[i] per prompt

Three sources (`eval.source`, `auto` picks the first that applies):

- `benchmarks`: the math JSONL files of `eval.benchmarks` (at most `eval.max_problems` each),
  rendered with `eval.template` and `eval.prompt_suffix`, judged like jobs/evaluate.py (last
  `\\boxed{}` against the reference, by mathematical equivalence). The headline is the
  unweighted mean over benchmarks, as in the paper's table; each benchmark is logged too.
- `short_answer`: the questions of `eval.short_answer_path` (JSONL of prompt, accepted answers and
  rivals; e.g. the real-model task `jobs/real_task.py prepare` writes), rendered as the training
  prompts are, judged by eopd_ray/evaluation/short_answer.py (an accepted answer named, no
  rival); adds `eval/<family>/avg@k` per question family.
- `toy`: a prepared toy task (eopd_ray/toy/prepare.py) beside `model.student_path`: its
  `eval.jsonl` (prompts neither model nor the distillation saw), judged by the task's checker;
  adds `eval/distinct_correct` (distinct correct answers per prompt) and `eval/coverage` (the
  same over min(samples, the prompt's number of correct answers)).
- `arithmetic`: `tiny.yaml`'s synthetic `question: what is a + b? answer:` prompts, a slice
  generated after the training ones (same generator, none equal to a training prompt), judged
  by the first integer of the answer.

Every metric is a fraction in [0, 1]: `eval/avg@k` is the mean over prompts of the fraction of
correct samples (all `eval.samples_per_problem` of them), `eval/pass@k` the unbiased estimate of
"at least one of k correct" (evaluation.math_answers.pass_at_k); every source also logs
`eval/eos_rate` (the fraction of samples that ended with the end-of-sequence token rather than at
`eval.max_new_tokens`) and `eval/response_len_mean`. Imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eopd_ray.config import Config, EvalConfig
from eopd_ray.core.prompts import render_prompt, toy_prompts
from eopd_ray.core.wire import RolloutBatch
from eopd_ray.errors import EopdError, VersionMismatch
from eopd_ray.evaluation.math_answers import load_benchmark, pass_at_k, score_benchmark

if TYPE_CHECKING:  # the driver's parts, for their types only: this module stays engine-free
    from eopd_ray.driver.recovery import Recovery
    from eopd_ray.driver.run_state import RunState
    from eopd_ray.driver.worker_groups import WorkerGroups

log = logging.getLogger(__name__)

Completions = Sequence[Sequence[str]]  # per prompt, the texts of its samples


class HeldOutError(EopdError):
    """No usable held-out prompts for evaluation during training; says which key to set."""


@dataclass(frozen=True)
class HeldOut:
    """The prompts to evaluate on and the function that turns completions into metrics."""

    source: str  # "benchmarks" | "short_answer" | "toy" | "arithmetic"
    prompts: list[list[int]]  # token ids, as the rollout workers take them
    judge: Callable[[Completions], dict[str, float]]
    tokenizer: Any  # the student's: response ids -> text

    def decode(self, response_ids: list[int]) -> str:
        return self.tokenizer.decode(response_ids, skip_special_tokens=True)

    def requests(self, e: EvalConfig, num_workers: int) -> list[tuple]:
        """The arguments of RolloutWorker.generate for each of (at most) `num_workers` workers:
        its share of the prompts, their indices, their seeds and the eval.* sampling. The seeds
        are fixed for the run and apart from the training streams: every evaluation sees the
        same sampling noise (the curve moves with the model), and a resumed run repeats them."""
        from eopd_ray.roles.rollout_engines import Sampling, prompt_seeds

        sampling = Sampling(e.samples_per_problem, e.temperature, e.top_p, e.max_new_tokens)
        seeds = prompt_seeds(f"eval/{e.seed}", range(len(self.prompts)))
        indices = list(range(len(self.prompts)))
        workers = min(num_workers, len(self.prompts))
        return [
            (self.prompts[r::workers], indices[r::workers], seeds[r::workers], sampling)
            for r in range(workers)
        ]

    def score(self, batch: RolloutBatch) -> dict[str, float]:
        """The metrics of a generated batch: its rows regrouped by prompt, decoded and judged,
        plus `eval/response_len_mean` and `eval/eos_rate` (samples that stopped by themselves)."""
        completions: list[list[str]] = [[] for _ in self.prompts]
        lengths = batch.response_mask.sum(1)
        for row, prompt in enumerate(batch.prompt_index.tolist()):
            ids = batch.response_ids[row, : int(lengths[row])].tolist()
            completions[prompt].append(self.decode(ids))
        metrics = self.judge(completions)
        metrics["eval/response_len_mean"] = float(lengths.float().mean())
        metrics["eval/eos_rate"] = batch.finish_reason.count("stop") / batch.num_sequences
        return metrics


def accuracy_metrics(correct: Sequence[Sequence[bool]], k: int) -> dict[str, float]:
    """`eval/avg@k`, `eval/pass@1` and `eval/pass@k` from per-prompt, per-sample verdicts."""
    n_prompts = len(correct)
    out = {f"eval/avg@{k}": sum(sum(c) / len(c) for c in correct) / n_prompts}
    for kk in sorted({1, k}):
        out[f"eval/pass@{kk}"] = sum(pass_at_k(len(c), sum(c), kk) for c in correct) / n_prompts
    return out


def summary_line(metrics: dict[str, float]) -> str:
    """`avg@8 0.612 pass@1 0.612 pass@8 0.982 ...`: the headline eval/* metrics, for the log."""
    return " ".join(
        f"{k.removeprefix('eval/')} {v:.3f}"
        for k, v in metrics.items()
        if k.startswith("eval/") and k.count("/") == 1
    )


def load_held_out(cfg: Config) -> HeldOut | None:
    """The held-out set for `cfg` (None when eval.every_steps is 0); HeldOutError when the
    configured source has no prompts, naming the key to set."""
    if cfg.eval.every_steps == 0:
        return None
    from transformers import AutoTokenizer

    source = cfg.eval.source
    if source == "auto":
        source = _auto_source(cfg)
    tokenizer = AutoTokenizer.from_pretrained(
        cfg.model.student_path, trust_remote_code=cfg.model.trust_remote_code
    )
    build = {
        "benchmarks": _benchmarks,
        "short_answer": _short_answer,
        "toy": _toy_task,
        "arithmetic": _arithmetic,
    }[source]
    texts, judge = build(cfg)
    template, suffix = _rendering(cfg, source)
    prompts = []
    for row, text in enumerate(texts):
        ids = render_prompt(f"{text} {suffix}".strip() if suffix else text, template, tokenizer)
        if len(ids) > cfg.data.max_prompt_tokens:
            raise HeldOutError(
                f"held-out prompt {row} ({source}) has {len(ids)} tokens > "
                f"data.max_prompt_tokens = {cfg.data.max_prompt_tokens}: raise the limit (and "
                "rollout.max_model_len), or lower eval.max_problems"
            )
        prompts.append(ids)
    return HeldOut(source, prompts, judge, tokenizer)


def _auto_source(cfg: Config) -> str:
    if cfg.eval.benchmarks:
        return "benchmarks"
    if cfg.eval.short_answer_path:
        return "short_answer"
    if _toy_prepared_dir(cfg) is not None:
        return "toy"
    if cfg.data.toy_prompts > 0:
        return "arithmetic"
    raise HeldOutError(
        "eval.every_steps > 0 needs held-out prompts: set eval.benchmarks to benchmark JSONL "
        "files (docs/evaluation.md), or set eval.every_steps: 0"
    )


def _rendering(cfg: Config, source: str) -> tuple[str, str]:
    """(template, suffix): benchmarks as jobs/evaluate.py renders them; the short-answer, toy
    and arithmetic prompts exactly as the training prompts are."""
    if source == "benchmarks":
        return cfg.eval.template, cfg.eval.prompt_suffix
    return cfg.data.student_template, cfg.data.prompt_suffix


# --------------------------------------------------------------------------------- benchmarks


def _benchmarks(cfg: Config) -> tuple[list[str], Callable[[Completions], dict[str, float]]]:
    e = cfg.eval
    benchmarks = []
    for path in e.benchmarks:
        problems = load_benchmark(path)
        benchmarks.append((Path(path).stem, problems[: e.max_problems or None]))
    texts = [p.problem for _, problems in benchmarks for p in problems]

    def judge(completions: Completions) -> dict[str, float]:
        out, start, avgs, passes = {}, 0, [], []
        for name, problems in benchmarks:
            chunk = completions[start : start + len(problems)]
            start += len(problems)
            score, _ = score_benchmark(name, problems, chunk, e.k)
            avgs.append(score.avg_at_k / 100)
            passes.append(score.pass_at_k / 100)
            out[f"eval/{name}/avg@{e.k}"] = avgs[-1]
            out[f"eval/{name}/pass@{e.k}"] = passes[-1]
        out[f"eval/avg@{e.k}"] = sum(avgs) / len(avgs)
        out[f"eval/pass@{e.k}"] = sum(passes) / len(passes)
        return out

    return texts, judge


# --------------------------------------------------------------------------------- short answers


def _short_answer(cfg: Config) -> tuple[list[str], Callable[[Completions], dict[str, float]]]:
    from eopd_ray.evaluation.short_answer import (
        QuestionFileError,
        judge_completions,
        read_questions,
    )

    try:
        questions = read_questions(cfg.eval.short_answer_path)
    except QuestionFileError as exc:
        raise HeldOutError(f"eval.short_answer_path: {exc}") from None
    k = cfg.eval.k

    def judge(completions: Completions) -> dict[str, float]:
        return judge_completions(questions, completions, k)

    return [q.prompt for q in questions], judge


# --------------------------------------------------------------------------------- toy task


def _toy_prepared_dir(cfg: Config) -> Path | None:
    """The prepared toy directory model.student_path lives in (<prepared>/student), if any."""
    from eopd_ray.toy.prepare import SETTINGS_FILE

    prepared = Path(cfg.model.student_path).parent
    return prepared if (prepared / SETTINGS_FILE).exists() else None


def _toy_task(cfg: Config) -> tuple[list[str], Callable[[Completions], dict[str, float]]]:
    from eopd_ray.toy.prepare import load_settings, read_prompts
    from eopd_ray.toy.task import judge_answers

    prepared = _toy_prepared_dir(cfg)
    if prepared is None:
        raise HeldOutError(
            f"eval.source: toy needs a prepared toy task: no settings.json beside "
            f"model.student_path ({cfg.model.student_path}); run jobs/prepare_toy.py"
        )
    task = load_settings(prepared).task
    texts = read_prompts(prepared / "eval.jsonl")
    k = cfg.eval.k

    def judge(completions: Completions) -> dict[str, float]:
        stats = [
            judge_answers(task, prompt, list(answers))
            for prompt, answers in zip(texts, completions, strict=True)
        ]
        n = len(texts)
        return accuracy_metrics([s.correct for s in stats], k) | {
            "eval/distinct_correct": sum(s.distinct for s in stats) / n,
            "eval/coverage": sum(s.coverage for s in stats) / n,
        }

    return texts, judge


# --------------------------------------------------------------------------------- arithmetic

_QUESTION = re.compile(r"what is (\d+) \+ (\d+)\?")
_FIRST_INTEGER = re.compile(r"-?\d+")


def arithmetic_held_out(num_train: int, count: int, seed: int) -> list[str]:
    """`count` synthetic prompts generated after the `num_train` training ones (the generator is
    sequential, so the training prompts are unchanged), none equal to a training prompt."""
    train = set(toy_prompts(num_train, seed))
    out: list[str] = []
    extra = count
    while len(out) < count:
        extra *= 2
        candidates = toy_prompts(num_train + extra, seed)[num_train:]
        out = list(dict.fromkeys(p for p in candidates if p not in train))[:count]
    return out


def arithmetic_is_correct(prompt: str, answer: str) -> bool:
    """Whether the first integer of `answer` is a + b for the prompt's question."""
    question = _QUESTION.search(prompt)
    given = _FIRST_INTEGER.search(answer)
    return bool(question and given) and int(given.group()) == sum(map(int, question.groups()))


def _arithmetic(cfg: Config) -> tuple[list[str], Callable[[Completions], dict[str, float]]]:
    d = cfg.data
    texts = arithmetic_held_out(d.toy_prompts, cfg.eval.arithmetic_prompts, d.seed)
    k = cfg.eval.k

    def judge(completions: Completions) -> dict[str, float]:
        verdicts = [
            [arithmetic_is_correct(prompt, a) for a in answers]
            for prompt, answers in zip(texts, completions, strict=True)
        ]
        return accuracy_metrics(verdicts, k)

    return texts, judge


class HeldOutEvaluation:
    """Evaluation during training (`eval.every_steps`): the current student on the rollout
    workers, judged by the run's `HeldOut` set."""

    def __init__(
        self,
        cfg: Config,
        groups: WorkerGroups,
        state: RunState,
        recovery: Recovery,
        held_out: HeldOut | None,
    ) -> None:
        self.cfg, self.groups, self.state, self.recovery = cfg, groups, state, recovery
        self.held_out = held_out

    def due(self, step: int) -> bool:
        every = self.cfg.eval.every_steps
        return bool(every) and ((step + 1) % every == 0 or step == self.cfg.run.steps - 1)

    def evaluate(self, step: int) -> dict[str, float]:
        """The student after `step` (the weights the rollout workers hold since the sync) on the
        held-out prompts, judged by the held-out set (eopd_ray/driver/held_out.py)."""
        held, rollout = self.held_out, self.groups.rollout
        assert held is not None, "evaluate() needs eval.every_steps > 0"
        args = held.requests(self.cfg.eval, len(rollout))
        ranks = list(range(len(args)))

        def generate() -> RolloutBatch:
            refs = rollout.call_each_async("generate", args)
            what = f"step {step} evaluation"
            return RolloutBatch.concat(
                rollout.get(refs, self.cfg.run.step_timeout_s, what, ranks=ranks)
            )

        started = time.perf_counter()
        batch = self.recovery.recovering(rollout, generate, f"step {step} evaluation")
        if batch.weight_version != self.state.version:
            raise VersionMismatch(
                f"step {step} evaluation: sampled with weight version {batch.weight_version}, "
                f"the student is at {self.state.version}"
            )
        metrics = held.score(batch) | {"time/eval_s": time.perf_counter() - started}
        log.info("held-out evaluation after step %d: %s", step, summary_line(metrics))
        return metrics
