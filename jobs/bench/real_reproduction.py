"""OPD vs EOPD vs eopd_all on the real pair (SmolLM2-135M-Instruct -> its 20-layer student), over
seeds, with paired 95% intervals: the evidence of docs/results.md's real-model section.

    python jobs/bench/real_reproduction.py [--methods opd eopd eopd_all] [--seeds 0 1 2]
                                           [--root runs/real/compare] [--fresh]
                                           [section.key=value ...]

Needs the prepared task and models of `make run-real` (jobs/fetch_real_model.py,
jobs/prune_student.py, `jobs/real_task.py prepare`); it says which is missing. For every
(method, seed), one after another (each run takes both cores), it runs `jobs/distill.py --config
jobs/configs/real.yaml loss.name=<method>` with the run's seeds (prompt order, sampling, learner)
set to <seed> — the same seeds for every method, so a seed's runs differ only in the loss — then
`jobs/real_task.py report` on the exported student: held-out Avg@4 / Pass@4 with the evaluation's
fixed sampling seeds, one greedy answer per question, and the closeness to the teacher (per-token
KL on the teacher's greedy answers, overall and where the teacher is uncertain; the teacher's NLL
of the student's samples). The budget (steps, batch, lr) is real.yaml's for every method, with the
overrides given here (DEFAULTS: 30 steps, evaluation at steps 14 and 29).

Writes under --root: results.json (every run and summary) and results.md (mean ± std [95% CI] per
method, paired per-seed differences with their 95% intervals). A run whose directory holds its
eval.json is reused, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from eopd_ray.env import set_job_environment  # noqa: E402

set_job_environment()

from eopd_ray.evaluation.seed_stats import Summary, describe, paired  # noqa: E402

CONFIG = REPO / "jobs" / "configs" / "real.yaml"
METHODS = ("opd", "eopd", "eopd_all")
SEED_KEYS = ("run.seed", "rollout.seed", "learner.seed", "data.seed")  # eval.seed stays fixed
DEFAULTS = ("run.steps=30", "eval.every_steps=15")
TABLE_KEYS = (  # (key, label, higher is better)
    ("eval/avg@4", "Avg@4", True),
    ("eval/pass@4", "Pass@4", True),
    ("greedy/accuracy", "greedy acc", True),
    ("kl/teacher_answers", "KL(T||S) teacher answers", False),
    ("kl/teacher_answers_uncertain", "KL where teacher H high", False),
    ("teacher/nll_of_samples", "teacher NLL of samples", False),
    ("eval/eos_rate", "EOS rate", True),
    ("mid/eval/avg@4", "Avg@4 mid-run", True),
    ("train/reverse_kl_last", "train RKL (last 10%)", False),
)
PAIRS = (("eopd", "opd"), ("eopd", "eopd_all"), ("eopd_all", "opd"))


def run(cmd: list[str], what: str) -> float:
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.monotonic() - started


def one_run(method: str, seed: int, root: Path, overrides: list[str], fresh: bool) -> dict:
    """Train and report one (method, seed) unless its eval.json exists; returns its record."""
    out = root / f"{method}-seed{seed}"
    done = out / "record.json"
    if done.exists() and not fresh:
        return json.loads(done.read_text())
    args = [
        f"loss.name={method}",
        f"run.output_dir={out}",
        "run.resume=never",
        *(f"{key}={seed}" for key in SEED_KEYS),
        *overrides,
    ]
    py = [sys.executable]
    train_s = run(
        [*py, "jobs/distill.py", "--config", str(CONFIG), "--no-progress", *args],
        f"training {out.name}",
    )
    report_s = run(
        [*py, "jobs/real_task.py", "report", "--config", str(CONFIG), *args], f"report {out.name}"
    )
    after = json.loads((out / "eval.json").read_text())[f"student after {method}"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    tail = rows[-max(1, len(rows) // 10) :]
    evaluated = [r for r in rows if "eval/avg@4" in r]
    mid = min(evaluated, key=lambda r: abs(r["step"] + 1 - len(rows) / 2))
    record = {
        "method": method,
        "seed": seed,
        "train_s": train_s,
        "report_s": report_s,
        **after,
        "mid/eval/avg@4": mid["eval/avg@4"],
        "mid/step": mid["step"],
        "train/reverse_kl_last": sum(r["kl/reverse_sampled"] for r in tail) / len(tail),
    }
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(done)  # last: a run counts as done only with its evaluation
    print(
        f"{method:9s} seed {seed}: Avg@4 {after['eval/avg@4']:.3f} greedy "
        f"{after['greedy/accuracy']:.3f} KL {after['kl/teacher_answers']:.3f} "
        f"({train_s:.0f} s + {report_s:.0f} s)",
        flush=True,
    )
    return record


def tables(records: list[dict], methods: list[str], seeds: list[int]) -> tuple[str, dict]:
    by = {(r["method"], r["seed"]): r for r in records}
    summary = {m: {k: describe([by[m, s][k] for s in seeds]) for k, _, _ in TABLE_KEYS}
               for m in methods}  # fmt: skip
    diffs = {
        f"{a} - {b}": {
            k: paired([by[a, s][k] for s in seeds], [by[b, s][k] for s in seeds])
            for k, _, _ in TABLE_KEYS
        }
        for a, b in PAIRS
        if a in methods and b in methods
    }
    n = len(seeds)
    head = " | ".join(label for _, label, _ in TABLE_KEYS)
    rule = "|---|" + "---:|" * len(TABLE_KEYS)

    def fmt(s: Summary) -> str:
        return f"{s.mean:.3f} ± {s.std:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}]"

    def fmt_diff(s: Summary) -> str:
        cell = f"{s.mean:+.3f} [{s.ci_low:+.3f}, {s.ci_high:+.3f}]"
        excludes_zero = s.std > 0 and (s.ci_low > 0 or s.ci_high < 0)  # n equal diffs: no interval
        return f"**{cell}**" if excludes_zero else cell

    lines = [f"| method (n={n} seeds) | {head} |", rule]
    for m, stats in summary.items():
        lines.append(f"| {m} | " + " | ".join(fmt(stats[k]) for k, _, _ in TABLE_KEYS) + " |")
    lines += ["", f"| difference (same seed, n={n}) | {head} |", rule]
    for name, stats in diffs.items():
        cells = [fmt_diff(stats[k]) for k, _, _ in TABLE_KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    def as_dicts(stats: dict[str, dict[str, Summary]]) -> dict:
        return {m: {k: dataclasses.asdict(v) for k, v in s.items()} for m, s in stats.items()}

    as_dict = {"summary": as_dicts(summary), "paired": as_dicts(diffs)}
    return "\n".join(lines), as_dict


def check_prepared() -> None:
    from eopd_ray.config import load_config

    cfg = load_config(CONFIG, [])
    needed = {
        cfg.model.teacher_path: "make real-model",
        cfg.model.student_path: "make run-real (it prunes the student once)",
        cfg.data.train_path: "make run-real (or jobs/real_task.py prepare)",
        cfg.eval.short_answer_path: "make run-real (or jobs/real_task.py prepare)",
    }
    for path, how in needed.items():
        if not (REPO / path).exists():
            raise SystemExit(f"{path} is missing: run `{how}` first")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Seeded OPD / EOPD / eopd_all on the real pair.")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--root", type=Path, default=REPO / "runs" / "real" / "compare")
    parser.add_argument("--fresh", action="store_true", help="rerun runs already done")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args(argv)
    check_prepared()
    overrides = [*DEFAULTS, *args.overrides]
    args.root.mkdir(parents=True, exist_ok=True)
    # Seed by seed: an interrupted comparison still has whole seeds to pair.
    records = [one_run(m, s, args.root.resolve(), overrides, args.fresh)
               for s in args.seeds for m in args.methods]  # fmt: skip
    table, stats = tables(records, args.methods, args.seeds)
    command = " ".join(["python jobs/bench/real_reproduction.py", *(argv or sys.argv[1:])])
    results = {"command": command, "config": str(CONFIG.relative_to(REPO)),
               "overrides": overrides, "runs": records, **stats}  # fmt: skip
    (args.root / "results.json").write_text(json.dumps(results, indent=2))
    (args.root / "results.md").write_text(f"`{command}`\n\n{table}\n")
    print(table)
    print(f"\nresults: {args.root / 'results.json'}, {args.root / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
