"""EOPD vs OPD and the two ablations on the toy task, over several seeds, with identical budgets.

    python jobs/bench/toy_reproduction.py [--seeds 0 1 2] [--methods opd eopd eopd_all eopd_random]
                                          [--out runs/toy/repro/results.json] [--quick]
                                          [section.key=value ...]

For every (method, seed) it runs `jobs/distill.py --config jobs/configs/toy.yaml loss.name=<method>`
with every seed set to <seed> (prompt order, sampling, learner), in its own process on the
embedded local Ray, then evaluates the exported student on the held-out prompts (8 samples per
prompt, temperature 1). Prints a mean +- std table per method, writes the JSON to --out and,
beside it, results.md and curves.png (training curves, mean +- std over seeds).

The toy models come from jobs/prepare_toy.py's cache (built when missing). --quick uses
barely-trained models and a few steps: it checks the machinery, not the science (about 2 min).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from eopd_ray.env import set_job_environment  # noqa: E402

set_job_environment()

METHODS = ("opd", "eopd", "eopd_all", "eopd_random")
TABLE_KEYS = (
    ("avg@8", "Avg@8"),
    ("pass@1", "Pass@1"),
    ("pass@8", "Pass@8"),
    ("distinct_correct", "distinct correct"),
    ("distinct_correct_frac", "path coverage"),
    ("student/entropy_mean", "entropy"),
    ("student/frac_high_entropy", "frac H>=tau"),
    ("fkl/high_entropy", "FKL on teacher H>=tau"),
    ("train/reverse_kl_last", "train RKL (last 10%)"),
)
CURVES = (
    "kl/reverse_sampled",
    "student/entropy_mean",
    "student/frac_high_entropy",
    "fkl/on_gated",
    "gate/frac",
    "rollout/response_len_mean",
)


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def run_one(method: str, seed: int, out_dir: Path, overrides: list[str]) -> float:
    """One distillation run in its own process; returns its wall time."""
    seeds = [f"{key}={seed}" for key in ("run.seed", "rollout.seed", "learner.seed", "data.seed")]
    cmd = [
        sys.executable,
        str(REPO / "jobs" / "distill.py"),
        "--config",
        str(REPO / "jobs" / "configs" / "toy.yaml"),
        "--no-progress",
        f"loss.name={method}",
        f"run.output_dir={out_dir}",
        "run.resume=never",
        *seeds,
        *overrides,
    ]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return time.monotonic() - started


def markdown_table(summary: dict[str, dict[str, tuple[float, float]]], seeds: int) -> str:
    lines = [
        f"| method (n={seeds} seeds) | " + " | ".join(label for _, label in TABLE_KEYS) + " |",
        "|---|" + "---:|" * len(TABLE_KEYS),
    ]
    for method, stats in summary.items():
        cells = [f"{stats[k][0]:.3f} ± {stats[k][1]:.3f}" for k, _ in TABLE_KEYS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Seeded OPD / EOPD / ablation comparison.")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "toy" / "repro")
    parser.add_argument("--out", type=Path, help="JSON results (default: <root>/results.json)")
    parser.add_argument("--quick", action="store_true", help="machinery check, ~2 minutes")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args(argv)

    import dataclasses

    import torch

    from eopd_ray.metrics import read_jsonl
    from eopd_ray.plots import plot_methods
    from eopd_ray.toy.evaluate import evaluate_toy
    from eopd_ray.toy.prepare import ToySettings, prepare_toy, read_prompts

    torch.set_num_threads(os.cpu_count() or 1)
    settings = ToySettings()
    overrides = list(args.overrides)
    if args.quick:
        settings = dataclasses.replace(settings, teacher_steps=30, student_steps=5)
        args.methods, args.seeds = args.methods[:2], args.seeds[:1]
        overrides += ["run.steps=4"]
    prepared = prepare_toy(REPO / "runs" / "toy" / "prepared", settings, log=lambda m: None)
    overrides = [
        f"model.student_path={prepared / 'student'}",
        f"model.teacher_path={prepared / 'teacher'}",
        f"data.train_path={prepared / 'train.jsonl'}",
        *overrides,
    ]
    held_out = read_prompts(prepared / "eval.jsonl")
    out = args.out or args.root / "results.json"
    results, curves = [], {}
    for method in args.methods:
        for seed in args.seeds:
            run_dir = args.root / f"{method}-seed{seed}"
            wall_s = run_one(method, seed, run_dir, overrides)
            rows = read_jsonl(run_dir / "metrics.jsonl")
            tail = rows[-max(1, len(rows) // 10) :]
            metrics = evaluate_toy(
                run_dir / "hf", settings.task, held_out, teacher_dir=prepared / "teacher"
            )
            metrics["train/reverse_kl_last"] = mean_std([r["kl/reverse_sampled"] for r in tail])[0]
            results.append({"method": method, "seed": seed, "wall_s": wall_s, **metrics})
            curves.setdefault(method, []).append(rows)
            print(
                f"{method:12s} seed {seed}: avg@8 {metrics['avg@8']:.3f} pass@8 "
                f"{metrics['pass@8']:.3f} distinct {metrics['distinct_correct']:.2f} "
                f"({wall_s:.0f} s)",
                flush=True,
            )
    summary = {
        method: {
            key: mean_std([r[key] for r in results if r["method"] == method])
            for key, _ in TABLE_KEYS
        }
        for method in args.methods
    }
    table = markdown_table(summary, len(args.seeds))
    baseline = json.loads((prepared / "baseline.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_methods(curves, CURVES, out.parent / "curves.png")
    out.write_text(
        json.dumps(
            {
                "command": " ".join(["python jobs/bench/toy_reproduction.py", *(argv or [])]),
                "overrides": overrides,
                "prepared": str(prepared),
                "baseline": baseline,
                "runs": results,
                "summary": {m: {k: list(v) for k, v in s.items()} for m, s in summary.items()},
            },
            indent=2,
        )
    )
    (out.parent / "results.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\nresults: {out}, curves: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
