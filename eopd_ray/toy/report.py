"""Markdown for the toy task's evaluations: the before/after table of `make run` and its report.

    table = comparison_table({"teacher": t, "student before": b, "student after": a})
    write_report(run_dir, columns, rows, command, plots)   # <run_dir>/report.md, linking plots

Pure: imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

# (key in evaluate_toy's result, label) in table order.
TABLE_ROWS = (
    ("avg@8", "Avg@8 (accuracy of a sample)"),
    ("pass@1", "Pass@1"),
    ("pass@4", "Pass@4"),
    ("pass@8", "Pass@8"),
    ("distinct_correct", "distinct correct answers / prompt (of 8 samples)"),
    ("distinct_correct_frac", "coverage of the prompt's shortest paths"),
    ("student/entropy_mean", "token entropy (nats)"),
    ("student/frac_high_entropy", "fraction of tokens with entropy >= tau"),
    ("fkl/high_entropy", "KL(teacher ‖ model) on teacher-uncertain tokens"),
)


def comparison_table(columns: dict[str, dict[str, float]]) -> str:
    """A markdown table: one row per metric, one column per evaluated model ("-" when absent)."""
    names = list(columns)
    lines = [
        "| metric | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for key, label in TABLE_ROWS:
        cells = [f"{columns[n][key]:.3f}" if key in columns[n] else "-" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean(rows: Sequence[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r]
    return sum(values) / len(values) if values else float("nan")


def _evaluation_section(rows: Sequence[dict]) -> list[str]:
    """Markdown lines: the held-out metrics logged during training (eval.every_steps), a row per
    evaluation; nothing when the run had none."""
    evaluated = [r for r in rows if any(k.startswith("eval/avg@") for k in r)]
    if not evaluated:
        return []
    keys = [
        k
        for k in sorted(evaluated[-1])
        if k.startswith(("eval/avg@", "eval/pass@", "eval/coverage", "eval/distinct"))
        and k.count("/") == 1
    ]
    lines = [
        "## Held-out evaluation during training (eval.every_steps)",
        "",
        "| steps done | " + " | ".join(k.removeprefix("eval/") for k in keys) + " |",
        "|---:|" + "---:|" * len(keys),
    ]
    for r in evaluated:
        cells = [f"{r[k]:.3f}" if k in r else "-" for k in keys]
        lines.append(f"| {r['step'] + 1} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_report(
    run_dir: Path,
    columns: dict[str, dict[str, float]],
    rows: Sequence[dict],
    command: str,
    plots: Sequence[Path],
) -> Path:
    """<run_dir>/report.md: the held-out table, the training summary and the curves."""
    head, tail = rows[: max(1, len(rows) // 10)], rows[-max(1, len(rows) // 10) :]
    step_s = _mean(rows[1:] or rows, "time/step_s")
    changed = [r["step"] for r in rows if r.get("run/config_changed")]
    warning = (
        [
            f"**Resumed at step {changed[0]} with run.allow_config_change:** the loss, the kept "
            "prompts or the LR schedule changed there (the driver log says which); the steps "
            "before and after it did not train the same way.",
            "",
        ]
        if changed
        else []
    )
    lines = [
        "# Toy run report",
        "",
        f"Command: `{command}`",
        "",
        *warning,
        "## Held-out prompts (8 samples per prompt, temperature 1)",
        "",
        comparison_table(columns),
        "",
        "## Training",
        "",
        f"- steps: {len(rows)}, mean step time after the first: {step_s:.2f} s",
        "- reverse KL (sampled, mean of the first / last 10% of steps): "
        f"{_mean(head, 'kl/reverse_sampled'):.3f} -> {_mean(tail, 'kl/reverse_sampled'):.3f}",
        "- student entropy on its rollouts: "
        f"{_mean(head, 'student/entropy_mean'):.3f} -> {_mean(tail, 'student/entropy_mean'):.3f}",
        f"- fraction of tokens gated to forward KL (teacher entropy >= tau): "
        f"{_mean(rows, 'gate/frac'):.3f}",
        "",
        *_evaluation_section(rows),
        "## Curves",
        "",
        *[f"![{p.stem}]({os.path.relpath(p, run_dir)})" for p in plots],
        "",
    ]
    path = run_dir / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)
    return path
