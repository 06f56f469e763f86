"""The toy report's markdown: one row per metric, one column per model, a valid table."""

from __future__ import annotations

from pathlib import Path

from eopd_ray.toy.report import TABLE_ROWS, comparison_table, write_report


def test_comparison_table_is_a_well_formed_markdown_table():
    full = {key: 0.5 for key, _ in TABLE_ROWS}
    teacher = {k: v for k, v in full.items() if k != "fkl/high_entropy"}
    table = comparison_table({"teacher": teacher, "student": full})
    lines = table.splitlines()
    assert len(lines) == 2 + len(TABLE_ROWS)
    # Every row has exactly the header's cell count: no stray "|" inside a label.
    assert {line.count("|") for line in lines} == {4}
    assert "| - | 0.500 |" in table  # a metric the teacher has no value for


def test_write_report_is_atomic_and_links_the_plots(tmp_path: Path):
    rows = [
        {
            "kl/reverse_sampled": 1.0,
            "student/entropy_mean": 1.0,
            "gate/frac": 0.2,
            "time/step_s": 1,
        },
        {
            "kl/reverse_sampled": 0.5,
            "student/entropy_mean": 0.8,
            "gate/frac": 0.2,
            "time/step_s": 1,
        },
    ]
    plot = tmp_path / "plots" / "overview.png"
    path = write_report(tmp_path, {"m": {"avg@8": 0.9}}, rows, "python x", [plot])
    text = path.read_text()
    assert "![overview](plots/overview.png)" in text and "1.000 -> 0.500" in text
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_report_tabulates_the_evaluations_logged_during_training(tmp_path: Path):
    rows = [
        {"step": s, "kl/reverse_sampled": 1.0, "student/entropy_mean": 1.0, "gate/frac": 0.2}
        for s in range(4)
    ]
    rows[1] |= {"eval/avg@8": 0.25, "eval/pass@8": 0.5, "eval/coverage": 0.125}
    rows[3] |= {"eval/avg@8": 0.75, "eval/pass@8": 1.0, "eval/coverage": 0.5}
    rows[3] |= {"eval/math/avg@8": 0.1}  # per-benchmark keys stay out of the summary table
    text = write_report(tmp_path, {"m": {"avg@8": 0.9}}, rows, "python x", []).read_text()
    assert "| steps done | avg@8 | coverage | pass@8 |" in text
    assert "| 2 | 0.250 | 0.125 | 0.500 |" in text and "| 4 | 0.750 | 0.500 | 1.000 |" in text
    assert "math" not in text
    # No evaluation during training: no section.
    plain = [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in rows]
    assert "during training" not in write_report(tmp_path, {}, plain, "x", []).read_text()


def test_report_says_when_a_resume_changed_what_was_trained(tmp_path: Path):
    rows = [
        {"step": s, "kl/reverse_sampled": 1.0, "student/entropy_mean": 1.0, "gate/frac": 0.2}
        for s in range(4)
    ]
    assert "allow_config_change" not in write_report(tmp_path, {}, rows, "x", []).read_text()
    for row in rows[2:]:
        row["run/config_changed"] = 1.0
    text = write_report(tmp_path, {}, rows, "x", []).read_text()
    assert "Resumed at step 2 with run.allow_config_change" in text
