"""EOPD vs OPD and the two ablations on both toy tasks, over several seeds, with identical budgets.

    python jobs/bench/toy_reproduction.py [--tasks graph chain] [--seeds 0 1 2 3 4]
                                          [--methods opd eopd eopd_all eopd_random]
                                          [--parallel 2] [--root runs/toy/repro] [--quick]
                                          [section.key=value ...]

For every (task, method, seed) it runs `jobs/distill.py --config <task config> loss.name=<method>`
with every seed set to <seed> (prompt order, sampling, learner) — the same seeds for every method
— in its own process on the embedded local Ray, `--parallel` runs at a time. The task configs
(jobs/configs/toy.yaml, toy_chain.yaml) fix the budget and hyperparameters, identical for every
method; they evaluate the student on the held-out prompts during training (eval.every_steps).
After each run the exported student is evaluated once more on the held-out prompts (8 samples per
prompt, temperature 1, with the teacher's entropy diagnostics).

Writes, under --root: results.json (every run, every summary), results.md (per task: mean ± std
and the 95% confidence interval over seeds of each metric, and the paired differences EOPD - OPD
and EOPD - eopd_all per seed with their intervals) and <task>-curves.png (held-out accuracy during
training, mean ± 95% band over seeds). A run whose directory already holds its final evaluation
is reused, so an interrupted comparison continues where it stopped (--fresh reruns everything).

--quick uses barely-trained models and a few steps: it checks the machinery, not the science.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from eopd_ray.env import set_job_environment  # noqa: E402

set_job_environment()

from eopd_ray.evaluation.seed_stats import Summary, describe, paired  # noqa: E402

METHODS = ("opd", "eopd", "eopd_all", "eopd_random")
TASKS = {"graph": "toy.yaml", "chain": "toy_chain.yaml"}
PREPARED_ROOTS = {"graph": "runs/toy/prepared", "chain": "runs/toy_chain/prepared"}
FINAL_EVAL = "final_eval.json"  # per run directory: the held-out evaluation of its student
TABLE_KEYS = (
    ("avg@8", "Avg@8"),
    ("pass@8", "Pass@8"),
    ("distinct_correct", "distinct correct"),
    ("distinct_correct_frac", "coverage"),
    ("student/entropy_mean", "entropy"),
    ("student/frac_high_entropy", "frac H>=tau"),
    ("fkl/high_entropy", "FKL on teacher H>=tau"),
    ("train/reverse_kl_last", "train RKL (last 10%)"),
    ("mid/avg@8", "Avg@8 mid-run"),
    ("mid/pass@8", "Pass@8 mid-run"),
)
PAIRS = (("eopd", "opd"), ("eopd", "eopd_all"), ("eopd", "eopd_random"))
PAIRED_KEYS = (
    "avg@8",
    "pass@8",
    "distinct_correct_frac",
    "fkl/high_entropy",
    "mid/avg@8",
    "mid/pass@8",
)
CURVES = ("eval/avg@8", "eval/pass@8", "eval/coverage", "kl/reverse_sampled", "fkl/on_gated")


def run_dir(root: Path, task: str, method: str, seed: int) -> Path:
    return root / task / f"{method}-seed{seed}"


def train(config: Path, method: str, seed: int, out: Path, overrides: list[str]) -> float:
    """One distillation run in its own process; returns its wall time."""
    seeds = [f"{key}={seed}" for key in ("run.seed", "rollout.seed", "learner.seed", "data.seed")]
    cmd = [
        sys.executable,
        str(REPO / "jobs" / "distill.py"),
        "--config",
        str(config),
        "--no-progress",
        f"loss.name={method}",
        f"run.output_dir={out}",
        "run.resume=never",
        *seeds,
        *overrides,
    ]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{out.name} ({config.name}) failed:\n{proc.stderr[-3000:]}")
    return time.monotonic() - started


def one_run(task: str, method: str, seed: int, ctx: dict, fresh: bool) -> dict:
    """Train (unless already done) and evaluate one (task, method, seed); returns its record."""
    from eopd_ray.telemetry.step_metrics import read_jsonl
    from eopd_ray.toy.evaluate import evaluate_toy

    out = run_dir(ctx["root"], task, method, seed)
    done = out / FINAL_EVAL
    if done.exists() and not fresh:
        record = json.loads(done.read_text())
        return record | mid_run(read_jsonl(out / "metrics.jsonl"))
    wall_s = train(ctx["config"], method, seed, out, ctx["overrides"])
    rows = read_jsonl(out / "metrics.jsonl")
    tail = rows[-max(1, len(rows) // 10) :]
    metrics = evaluate_toy(
        out / "hf", ctx["task"], ctx["held_out"], teacher_dir=ctx["prepared"] / "teacher"
    )
    metrics["train/reverse_kl_last"] = sum(r["kl/reverse_sampled"] for r in tail) / len(tail)
    metrics |= mid_run(rows)
    record = {"task": task, "method": method, "seed": seed, "wall_s": wall_s, **metrics}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, done)  # written last: a run counts as done only with its evaluation
    print(
        f"{task:5s} {method:12s} seed {seed}: avg@8 {metrics['avg@8']:.3f} pass@8 "
        f"{metrics['pass@8']:.3f} coverage {metrics['distinct_correct_frac']:.3f} ({wall_s:.0f} s)",
        flush=True,
    )
    return record


def mid_run(rows: list[dict]) -> dict[str, float]:
    """The held-out evaluation logged during training nearest to half the run (`mid/*`): where
    accuracy is still climbing, so that differences in learning speed show before Pass@8
    saturates."""
    evaluated = [r for r in rows if "eval/avg@8" in r]
    if not evaluated:
        return {}
    half = len(rows) / 2
    row = min(evaluated, key=lambda r: abs(r["step"] + 1 - half))
    return {
        "mid/avg@8": row["eval/avg@8"],
        "mid/pass@8": row["eval/pass@8"],
        "mid/step": row["step"] + 1,
    }


def fmt(s: Summary) -> str:
    return f"{s.mean:.3f} ± {s.std:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}]"


def markdown_table(summary: dict[str, dict[str, Summary]], seeds: int) -> str:
    """One row per method: mean ± sample std [95% CI] of each metric."""
    lines = [
        f"| method (n={seeds} seeds) | " + " | ".join(label for _, label in TABLE_KEYS) + " |",
        "|---|" + "---:|" * len(TABLE_KEYS),
    ]
    for method, stats in summary.items():
        cells = [fmt(stats[k]) if k in stats else "-" for k, _ in TABLE_KEYS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(diffs: dict[str, dict[str, Summary]], seeds: int) -> str:
    """One row per comparison: the mean per-seed difference [95% CI] of each metric."""
    labels = dict(TABLE_KEYS)
    lines = [
        f"| difference (same seed, n={seeds}) | "
        + " | ".join(labels[k] for k in PAIRED_KEYS)
        + " |",
        "|---|" + "---:|" * len(PAIRED_KEYS),
    ]
    for name, stats in diffs.items():
        cells = [
            f"{stats[k].mean:+.3f} [{stats[k].ci_low:+.3f}, {stats[k].ci_high:+.3f}]"
            for k in PAIRED_KEYS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(records: list[dict], methods: list[str], seeds: list[int]):
    """(per-method summaries, paired differences) of one task's records."""
    by = {(r["method"], r["seed"]): r for r in records}
    summary = {
        m: {
            k: describe([by[m, s][k] for s in seeds])
            for k, _ in TABLE_KEYS
            if all(k in by[m, s] for s in seeds)
        }
        for m in methods
    }
    diffs = {
        f"{a} - {b}": {
            k: paired([by[a, s][k] for s in seeds], [by[b, s][k] for s in seeds])
            for k in PAIRED_KEYS
        }
        for a, b in PAIRS
        if a in methods and b in methods
    }
    return summary, diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Seeded OPD / EOPD / ablation comparison.")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "toy" / "repro")
    parser.add_argument("--fresh", action="store_true", help="rerun runs already done")
    parser.add_argument("--quick", action="store_true", help="machinery check, a few minutes")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args(argv)

    import torch

    from eopd_ray.config import load_config
    from eopd_ray.evaluation.plots import plot_methods
    from eopd_ray.telemetry.step_metrics import read_jsonl
    from eopd_ray.toy.prepare import default_settings, load_baseline, prepare_toy, read_prompts

    # Evaluations run beside training processes: one thread each.
    torch.set_num_threads(1 if args.parallel > 1 else os.cpu_count() or 1)
    overrides = list(args.overrides)
    if args.quick:
        args.methods, args.seeds = args.methods[:2], args.seeds[:2]
        overrides += ["run.steps=4", "eval.every_steps=2"]
    results: dict = {"command": " ".join(["python jobs/bench/toy_reproduction.py", *(argv or [])])}
    report = []
    for task in args.tasks:
        settings = default_settings(task)
        if args.quick:
            settings = dataclasses.replace(settings, teacher_steps=30, student_steps=5)
        # --quick models are prepared apart: `current` of the real cache keeps pointing at the
        # trained ones that `make run` uses.
        cache = args.root / "prepared" / task if args.quick else REPO / PREPARED_ROOTS[task]
        prepared = prepare_toy(cache, settings, log=print)
        config = REPO / "jobs" / "configs" / TASKS[task]
        ctx = {
            "root": args.root,
            "config": config,
            "task": settings.task,
            "prepared": prepared,
            "held_out": read_prompts(prepared / "eval.jsonl"),
            "overrides": [
                "model.build_toy=false",  # the models are prepared above, by hash
                f"model.student_path={prepared / 'student'}",
                f"model.teacher_path={prepared / 'teacher'}",
                f"data.train_path={prepared / 'train.jsonl'}",
                *overrides,
            ],
        }
        jobs = [(task, m, s, ctx, args.fresh) for m in args.methods for s in args.seeds]
        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            records = list(pool.map(lambda job: one_run(*job), jobs))
        summary, diffs = summarise(records, args.methods, args.seeds)
        curves = {
            m: [read_jsonl(run_dir(args.root, task, m, s) / "metrics.jsonl") for s in args.seeds]
            for m in args.methods
        }
        baseline = load_baseline(prepared)
        plot = plot_methods(
            curves,
            CURVES,
            args.root / f"{task}-curves.png",
            start={
                "eval/avg@8": baseline["student"]["avg@8"],
                "eval/pass@8": baseline["student"]["pass@8"],
                "eval/coverage": baseline["student"]["distinct_correct_frac"],
            },
            band="ci",
        )
        cfg = load_config(config, ctx["overrides"])
        results[task] = {
            "config": str(config.relative_to(REPO)),
            "overrides": ctx["overrides"],
            "budget": {
                "steps": cfg.run.steps,
                "sequences_per_step": cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt,
                "lr": cfg.learner.lr,
            },
            "prepared": str(prepared),
            "baseline": baseline,
            "runs": records,
            "summary": {
                m: {k: dataclasses.asdict(v) for k, v in s.items()} for m, s in summary.items()
            },
            "paired": {
                n: {k: dataclasses.asdict(v) for k, v in d.items()} for n, d in diffs.items()
            },
            "curves": str(plot),
        }
        report += [
            f"## {task}",
            "",
            markdown_table(summary, len(args.seeds)),
            "",
            paired_table(diffs, len(args.seeds)),
            "",
            f"![{task}: held-out accuracy during training]({plot.name})",
            "",
        ]
    args.root.mkdir(parents=True, exist_ok=True)
    (args.root / "results.json").write_text(json.dumps(results, indent=2))
    (args.root / "results.md").write_text("\n".join(report))
    print("\n".join(report))
    print(f"\nresults: {args.root / 'results.json'}, {args.root / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
