"""The benchmarks still run (quick mode) and their JSON carries the documented keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "jobs" / "bench"

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "script, key",
    [
        ("loss_memory.py", "peak_ratio"),
        ("ragged.py", "speedup_vs_fixed"),
        ("teacher_payload.py", "payload_bytes_per_token"),
        ("throughput.py", "ratio_to_compute_floor"),
        ("weight_sync.py", "ratio_to_floor"),
    ],
)
def test_bench_quick_mode_writes_its_json(script, key, tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = data.get("shapes") or data.get("rows") or data.get("configs") or data.get("sizes")
    assert rows
    for row in rows:
        values = [row[key]] if key in row else [t[key] for t in row["transports"].values()]
        assert values and all(v > 0 for v in values), row
    if script == "ragged.py":  # the three figures, per configuration
        assert {"padded_fraction", "speedup_vs_fixed", "rank_imbalance"} <= set(rows[0])


def test_gpu_check_runs_its_code_on_cpu_with_tiny_shapes(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu_check.py"),
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["card"] == "cpu"
    assert data["learner_qwen3_1.7b"]["tokens_per_s"] > 0
    assert data["teacher_qwen3_8b"]["response_tokens_per_s"] > 0
    loss = data["loss_kernel"]
    assert [r["path"] for r in loss] == ["plain", "lean", "fused"]
    assert abs(loss[2]["loss"] - loss[0]["loss"]) < 1e-2 * abs(loss[0]["loss"])  # bf16 logits
    # The real workers without Ray: teacher scores and both ZeRO stages pass the invariants.
    workers = data["workers"]
    assert workers["teacher"]["invariants"] == "pass"
    assert workers["teacher"]["response_tokens_per_s"] > 0
    for stage in (2, 3):
        learner = workers[f"learner_zero{stage}"]
        assert learner["invariants"] == "pass" and learner["fused_head"] is True
        assert learner["tokens_per_s"] > 0


def test_reproduction_summary_has_intervals_and_paired_differences():
    sys.path.insert(0, str(BENCH))
    from toy_reproduction import TABLE_KEYS, markdown_table, paired_table, summarise

    seeds = [0, 1, 2, 3, 4]
    base = {"opd": 0.70, "eopd": 0.72, "eopd_all": 0.75}
    records = [
        {"method": m, "seed": s, **{k: base[m] + 0.01 * s for k, _ in TABLE_KEYS}}
        for m in base
        for s in seeds
    ]
    summary, diffs = summarise(records, list(base), seeds)
    avg = summary["eopd"]["avg@8"]
    assert (
        avg.n == 5
        and avg.mean == pytest.approx(0.74)
        and avg.std == pytest.approx(0.0158, abs=1e-4)
    )
    # t(0.975, 4) = 2.776: the interval is wider than a normal one would be.
    assert avg.ci_high - avg.mean == pytest.approx(2.776 * avg.std / 5**0.5, abs=1e-4)
    # Same seed, same offset: the paired difference is exact, with a zero-width interval.
    d = diffs["eopd - opd"]["avg@8"]
    assert d.mean == pytest.approx(0.02) and d.ci_high - d.ci_low == pytest.approx(0, abs=1e-12)
    assert set(diffs) == {"eopd - opd", "eopd - eopd_all"}  # no eopd_random records
    table = markdown_table(summary, seeds=5)
    assert "n=5 seeds" in table and "| eopd | 0.740 ± 0.016 [0.720, 0.760]" in table
    assert "| eopd - opd | +0.020 [+0.020, +0.020]" in paired_table(diffs, 5)


def test_stop_rate_model_ends_responses_at_about_the_asked_rate(tiny_pair, tmp_path):
    """jobs/bench/throughput.py --ragged: the calibrated copy samples EOS at about stop_p per
    token (within 3x: a linear fit of the EOS logit) on contexts it was not fitted on; the
    backbone is untouched."""
    import torch
    from transformers import AutoModelForCausalLM

    from eopd_ray.toy.models import with_stop_rate

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (8,), generator=g).tolist() for _ in range(24)]
    path = with_stop_rate(tiny_pair[0], tmp_path / "stop", 0.05, prompts[:16])
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_pair[0]).eval()
    eos = model.config.eos_token_id
    assert not model.config.tie_word_embeddings
    torch.manual_seed(1)
    probs = []
    with torch.no_grad():
        for prompt in prompts[16:]:
            ids = torch.tensor([prompt])
            out = base.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=32,
                do_sample=True,
                pad_token_id=eos,
            )
            logp = torch.log_softmax(model(out).logits[0, len(prompt) - 1 : -1], -1)
            probs.append(logp[:, eos].exp())
    mean = float(torch.cat(probs).mean())
    assert 0.05 / 3 < mean < 0.05 * 3, mean  # a random model: ~1 / 320
    same = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(same, base.model.layers[0].mlp.up_proj.weight)
