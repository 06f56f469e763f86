"""End-to-end throughput against the machine's compute floor, per config and step mode.

    python jobs/bench/throughput.py [--configs tiny toy bench] [--modes sync streamed async]
                                    [--ragged] [--steps 4] [--quick] [--out FILE]
                                    [section.key=value ...]

For each config and mode it starts the real pipeline on the embedded local Ray, runs `--warmup`
steps (not counted: first-call compilation, allocator growth) and then `--steps` timed steps,
and reports:

- student tokens trained per second (response tokens of the step over the step's wall time);
- the share of the wall time spent in each stage of the critical path: rollout, teacher (the
  streamed step: only what scoring adds after the last group arrived), train, rollout_wait (async
  mode: waiting for the prefetched rollout after training), sync, and overhead = wall - the
  stages (driver work, batching, Ray round trips);
- each role's busy fraction (roles/<role>_busy_s over the step: the time its workers computed)
  and step / slowest role (1.0: the step is as short as its busiest role);
- the compute floor: the step's matmul FLOPs over the matmul throughput measured on this machine
  in the same run. Per sequence of P prompt + R response tokens, with N = a model's parameters
  that multiply (embedding lookups excluded, the LM head included) and H its LM head:
  rollout 2 N_s (P + R); teacher 2 (N_t - H_t)(P + R) + 2 H_t R (head on response positions
  only); learner 2 N_s-style forward for pi_old when it was a forward of its own (not when the
  step took it from the update's forward: `learner/old_logprobs_from_update`), and
  6 (N_s - H_s)(P + R) + 6 H_s R for the update. Attention score FLOPs are left out (sequences
  here are <= 200 tokens). `ratio_to_compute_floor` = measured wall time / floor (1.0 = every
  core multiplying all the time).

The machine's matmul throughput is the best of: torch.mm on all cores, and one core's rate times
the number of cores (the pipeline runs one single-threaded process per worker), over the GEMM
shapes of the models in the run, sampled before every mode and after the last, best of all
samples: a shared machine's mood changes through a run, and the floor must not move with it.
It is measured in each dtype the run's configs use (`model.dtype=bfloat16` as an override: a CPU
with avx512_bf16 or AMX multiplies bf16 several times faster than fp32); the teacher's LM head is
counted at the fp32 rate in every dtype (on CPU it is an fp32 copy: exact entropies).
Models: tiny (built), toy (jobs/prepare_toy.py's cache, built when missing, ~2 min), bench
(built, ~10 s).

Modes: `sync` (rollout.stream: false, the whole batch handed over at each stage), `streamed`
(rollout.stream: true), `async` (synchronous hand-off, rollout.async_lag: 1) and `streamed-async`.
The step ratios between modes are printed after the table. `--ragged`: the bench student and
teacher end a response with probability ~1/50 per token (eopd_ray.toy.models.with_stop_rate), so
lengths are ragged as real ones are (a random model runs every response to the cap, and a teacher
that never stops would train the student not to), with learner.lr = 1e-9 so that training does
not move the lengths during the run (the work per step is the same at any lr); the table reports
the median length and the fraction at the cap. --quick: tiny only, streamed, 1 warm-up + 2
timed steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from eopd_ray.env import set_job_environment  # noqa: E402

set_job_environment()

CONFIGS = ("tiny", "toy", "bench")
STAGES = ("rollout", "teacher", "train", "rollout_wait", "sync")  # rollout_wait: async mode
ROLES = ("rollout", "teacher", "learner")
MODES = {
    "sync": ["rollout.stream=false"],
    "streamed": ["rollout.stream=true"],
    "async": ["rollout.stream=false", "rollout.async_lag=1", "learner.old_logprobs=sampler"],
    "streamed-async": [
        "rollout.stream=true",
        "rollout.async_lag=1",
        "learner.old_logprobs=sampler",
    ],
}
STOP_P = 1 / 50  # --ragged: per-token chance the bench student ends its response


def matmul_gflops(
    shapes: list[tuple[int, int, int]], seconds: float = 0.5, dtype: str = "float32"
) -> dict[str, float]:
    """Best sustained torch.mm GFLOP/s over `shapes` (m, k, n) in `dtype`: all cores in one
    process, and one core times the core count."""
    import torch

    def rate(threads: int) -> float:
        torch.set_num_threads(threads)
        best = 0.0
        for m, k, n in shapes:
            a = torch.randn(m, k, dtype=getattr(torch, dtype))
            b = torch.randn(k, n, dtype=getattr(torch, dtype))
            torch.mm(a, b)  # warm-up
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                torch.mm(a, b)
                done += 1
            best = max(best, 2 * m * k * n * done / (time.perf_counter() - started) / 1e9)
        return best

    cores = len(os.sched_getaffinity(0))
    one = rate(1)
    every = rate(cores)
    torch.set_num_threads(1)
    return {"cores": cores, "one_core": one, "all_cores": every, "peak": max(every, one * cores)}


def multiplying_parameters(model_dir: str | Path) -> tuple[int, int, int]:
    """(N, LM head, hidden) of a model: parameters used in matmuls (embedding lookup excluded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = config.vocab_size * config.hidden_size
    return total - (0 if config.tie_word_embeddings else embed), head, config.hidden_size


def step_flops(
    cfg, prompt_tokens: float, response_tokens: float, old_from_update: bool
) -> dict[str, float]:
    """Matmul FLOPs of one step, per stage, for the step's total prompt / response tokens;
    `teacher_head`: the teacher's LM head, apart (fp32 on CPU whatever model.dtype is).
    `old_from_update`: pi_old came from the update's forward (no forward of its own)."""
    n_s, h_s, _ = multiplying_parameters(cfg.model.student_path)
    n_t, h_t, _ = multiplying_parameters(cfg.model.teacher_path)
    p, r = prompt_tokens, response_tokens
    forward_s = 2 * (n_s - h_s) * (p + r) + 2 * h_s * r
    flops = {
        "rollout": 2 * n_s * (p + r),
        "teacher": 2 * (n_t - h_t) * (p + r),
        "teacher_head": 2 * h_t * r,
        "train": 3 * forward_s,  # forward + backward = 3 forwards
    }
    if cfg.learner.old_logprobs == "recompute" and not old_from_update:
        flops["train"] += forward_s
    return flops


def config_for(name: str, out_dir: Path, steps: int, overrides: list[str], ragged: bool = False):
    from eopd_ray.config import load_config

    extra = [f"run.output_dir={out_dir}", f"run.steps={steps}", "run.export_hf=false"]
    if name == "tiny":
        from eopd_ray.toy.models import ensure_tiny_models

        cfg = load_config(REPO / "jobs/configs/tiny.yaml", [*extra, *overrides])
        ensure_tiny_models(cfg.model.student_path, cfg.model.teacher_path)
        return cfg
    if name == "toy":
        from eopd_ray.toy.prepare import ToySettings, prepare_toy

        prepared = prepare_toy(REPO / "runs/toy/prepared", ToySettings(), log=print)
        paths = [
            "model.build_toy=false",
            f"model.student_path={prepared / 'student'}",
            f"model.teacher_path={prepared / 'teacher'}",
            f"data.train_path={prepared / 'train.jsonl'}",
        ]
        return load_config(REPO / "jobs/configs/toy.yaml", [*paths, *extra, *overrides])
    from eopd_ray.toy.models import ensure_bench_models

    student, teacher = ensure_bench_models(REPO / "runs/bench/models")
    if ragged:  # calibrated on responses to the bench's own prompts
        from eopd_ray.core.prompts import tokenize_prompts
        from eopd_ray.toy.models import with_stop_rate

        base = load_config(REPO / "jobs/configs/bench.yaml", [f"model.student_path={student}"])
        prompts = tokenize_prompts(base)[0][:32]
        # Both models: a teacher that never ends a response would teach the student not to.
        models = REPO / "runs/bench/models"
        student = with_stop_rate(student, models / f"student-stop{STOP_P:.3f}", STOP_P, prompts)
        teacher = with_stop_rate(teacher, models / f"teacher-stop{STOP_P:.3f}", STOP_P, prompts)
    paths = [f"model.student_path={student}", f"model.teacher_path={teacher}"]
    if ragged:  # a negligible step: the lengths stay those of the calibrated models
        paths.append("learner.lr=1e-9")
    return load_config(REPO / "jobs/configs/bench.yaml", [*paths, *extra, *overrides])


def measure(cfg, warmup: int, steps: int) -> list[dict[str, float]]:
    """Wall time and stage times of `steps` steps after `warmup` untimed ones."""
    from eopd_ray.driver.pipeline import Pipeline

    pipeline = Pipeline(cfg)
    rows, lengths = [], []
    shares = pipeline._learner_shares  # sees every step's batch, in every mode

    def recording_lengths(batch):
        lengths.extend(batch.response_mask.sum(1).tolist())
        return shares(batch)

    pipeline._learner_shares = recording_lengths
    try:
        pipeline.start()
        for step in range(warmup + steps):
            started = time.perf_counter()
            lengths.clear()
            metrics = pipeline.step(step)
            metrics["wall_s"] = time.perf_counter() - started
            metrics["_lengths"] = list(lengths)
            if step >= warmup:
                rows.append(metrics)
    finally:
        pipeline.shutdown()
    return rows


def stage_rates(cfg, rates: dict[str, float]) -> dict[str, float]:
    """GFLOP/s each stage of step_flops multiplies at, from the measured rate per dtype."""
    rate = rates[cfg.model.dtype]
    return {"rollout": rate, "teacher": rate, "teacher_head": rates["float32"], "train": rate}


def summarize(name: str, mode: str, cfg, rows: list[dict], rates: dict[str, float]) -> dict:
    mean = lambda key: sum(r.get(key, 0.0) for r in rows) / len(rows)  # noqa: E731
    wall = mean("wall_s")
    sequences = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    response = mean("tokens/trained")
    prompt = mean("rollout/prompt_tokens") if "rollout/prompt_tokens" in rows[0] else 0.0
    flops = step_flops(cfg, prompt, response, mean("learner/old_logprobs_from_update") == 1)
    per_stage = stage_rates(cfg, rates)
    floor_stage_s = {k: v / (per_stage[k] * 1e9) for k, v in flops.items()}
    floor = sum(floor_stage_s.values())
    shares = {stage: mean(f"time/{stage}_s") / wall for stage in STAGES}
    shares["overhead"] = 1.0 - sum(shares.values())
    lengths = sorted(length for r in rows for length in r.get("_lengths", []))
    cap = cfg.rollout.max_new_tokens
    return {
        "config": name,
        "mode": mode,
        "steps_timed": len(rows),
        "response_len_median": lengths[len(lengths) // 2] if lengths else 0,
        "at_cap_frac": sum(n >= cap for n in lengths) / max(1, len(lengths)),
        "busy_frac": {role: mean(f"roles/{role}_busy_s") / wall for role in ROLES},
        "step_over_slowest": mean("roles/step_over_slowest"),
        "sequences_per_step": sequences,
        "response_tokens_per_step": response,
        "prompt_tokens_per_step": prompt,
        "step_s": wall,
        "tokens_per_s": response / wall,
        "stage_share": shares,
        "stage_s": {stage: mean(f"time/{stage}_s") for stage in STAGES},
        "flops_per_step": flops,
        "floor_s": floor,
        "floor_stage_s": floor_stage_s,
        "dtype": cfg.model.dtype,
        "ratio_to_compute_floor": wall / floor,
    }


def print_table(results: list[dict], machines: dict[str, dict]) -> None:
    print()
    for dtype, m in machines.items():
        print(
            f"matmul {dtype}: {m['one_core']:.1f} GFLOP/s one core, {m['all_cores']:.1f} all "
            f"{m['cores']} cores -> floor rate {m['peak']:.1f} GFLOP/s (best of "
            f"{m['samples']} samples through the run)"
        )
    print()
    stages = " ".join(f"{s:>12s}" for s in (*STAGES, "overhead"))
    busy = " ".join(f"{r + ' busy':>13s}" for r in ROLES)
    print(
        f"{'config':7s} {'dtype':8s} {'mode':15s} {'step s':>7s} {'tok/s':>7s} {'floor s':>7s} "
        f"{'ratio':>6s} "
        f"{'len p50':>7s} {'at cap':>6s}  {stages}  {busy} {'step/slowest':>12s}"
    )
    for r in results:
        shares = " ".join(f"{100 * r['stage_share'][s]:11.1f}%" for s in (*STAGES, "overhead"))
        fracs = " ".join(f"{100 * r['busy_frac'][role]:12.1f}%" for role in ROLES)
        print(
            f"{r['config']:7s} {r['dtype']:8s} {r['mode']:15s} {r['step_s']:7.3f} "
            f"{r['tokens_per_s']:7.0f} "
            f"{r['floor_s']:7.3f} {r['ratio_to_compute_floor']:6.1f} "
            f"{r['response_len_median']:7.0f} {100 * r['at_cap_frac']:5.0f}%  {shares}  {fracs} "
            f"{r['step_over_slowest']:12.2f}"
        )
    for name, dtype in dict.fromkeys((r["config"], r["dtype"]) for r in results):
        by_mode = {
            r["mode"]: r["step_s"] for r in results if (r["config"], r["dtype"]) == (name, dtype)
        }
        if "sync" in by_mode:
            ratios = ", ".join(
                f"{mode} {step / by_mode['sync']:.2f}x" for mode, step in by_mode.items()
            )
            print(f"{name} {dtype}: step time / sync: {ratios}")


def measure_against_floor(
    runs: list[tuple[str, str, object]], warmup: int, steps: int
) -> tuple[list[dict], dict[str, dict]]:
    """Measure each (config name, mode, cfg) and sample the matmul rate of every dtype the runs
    use before each and after the last: (summaries, the best sample per dtype)."""
    dtypes = sorted({"float32", *(cfg.model.dtype for _, _, cfg in runs)})
    shapes = set()
    for _, _, cfg in runs:
        for path in (cfg.model.student_path, cfg.model.teacher_path):
            _, _, hidden = multiplying_parameters(path)
            shapes.add((1024, hidden, 4 * hidden))
    samples: dict[str, list[dict]] = {dtype: [] for dtype in dtypes}

    def sample() -> None:  # interleaved with the runs: the floor's best sample wins
        for dtype in dtypes:
            samples[dtype].append(matmul_gflops(sorted(shapes), dtype=dtype))

    measured = []
    for name, mode, cfg in runs:
        sample()
        print(
            f"{name} {cfg.model.dtype} {mode}: {warmup} warm-up + {steps} timed steps ...",
            flush=True,
        )
        measured.append((name, mode, cfg, measure(cfg, warmup, steps)))
    sample()
    machines = {}
    for dtype, taken in samples.items():
        best = max(taken, key=lambda m: m["peak"])
        machines[dtype] = {
            **best,
            "samples": len(taken),
            "peak_samples": [m["peak"] for m in taken],
        }
    rates = {dtype: m["peak"] for dtype, m in machines.items()}
    return [summarize(name, mode, cfg, rows, rates) for name, mode, cfg, rows in measured], machines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pipeline throughput vs the compute floor.")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--modes", nargs="+", default=["sync"], choices=list(MODES))
    parser.add_argument("--ragged", action="store_true", help="bench: ragged response lengths")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per config")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--quick", action="store_true", help="tiny only, 2 timed steps")
    parser.add_argument("--out", help="write the results as JSON (a path or a URI)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every config")
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.modes, args.steps, args.warmup = ["tiny"], ["streamed"], 2, 1
    with tempfile.TemporaryDirectory(prefix="eopd-bench-") as tmp:
        runs = [
            (
                name,
                mode,
                config_for(
                    name,
                    Path(tmp) / name / mode,
                    args.warmup + args.steps,
                    [*MODES[mode], *args.overrides],
                    ragged=args.ragged,
                ),
            )
            for name in args.configs
            for mode in args.modes
        ]
        results, machines = measure_against_floor(runs, args.warmup, args.steps)
    print_table(results, machines)
    if args.out:
        from eopd_ray.storage.outputs import write_json_output

        where = write_json_output(args.out, {"machines": machines, "configs": results})
        print(f"results: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
