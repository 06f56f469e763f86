"""Teacher and learner on ragged response lengths: fixed-count vs token-budget micro-batches.

    python jobs/bench/ragged.py [--quick] [--steps 2] [--out FILE]

Real on-policy batches are ragged: math reasoning responses run from a few tokens to the cap
with a long tail. This benchmark scores and trains on synthetic `RolloutBatch`es whose response
lengths are log-normal (median cap / 6, sigma 1.0: ~4% reach the cap), through the real
`TeacherWorker` (one, in this process) and the real `LearnerWorker` (2 ranks, ZeRO-2, gloo, one
process each), at the bench model sizes (26M student, 100M teacher, 32k vocabulary, cap 512).
`--quick`: the same models and length distribution with cap 128 and 32 sequences, one timed
step and no warm-up (about a minute), for the test suite.

Configurations (same batch, same seeds):
- `fixed`: today's layout: `micro_batch_size` sequences per forward in arrival order, ranks get
  equal sequence counts, every micro-batch's LM head and loss run over the step's full padded
  response width;
- `budget`: sequences sorted by length and grouped under `max_tokens_per_micro_batch`, each
  micro-batch cut to its own longest sequence, ranks balanced by tokens (core.micro_batches).
  The budget equals the fixed layout's worst case (micro_batch_size x (longest prompt + cap)), so
  the peak memory a GPU must provision is the same.

Per configuration: padded fraction (positions the backbone computes that hold no token, and LM
head rows that hold none) for teacher and learner, teacher and learner seconds per step, student
tokens per second over both, peak RSS per learner rank (VmHWM, reset before the step), token
imbalance between the ranks. Times are medians of `--steps` after a warm-up step; compare ratios
of one run (2 shared cores are noisy).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from eopd_ray.env import set_job_environment  # noqa: E402

set_job_environment()

import torch  # noqa: E402

from eopd_ray.core.micro_batches import share_step  # noqa: E402
from eopd_ray.core.wire import RolloutBatch, TeacherScores  # noqa: E402
from eopd_ray.ports import free_port  # noqa: E402

WORLD = 2
CONFIGS = ("fixed", "budget")


def ragged_batch(num: int, cap: int, vocab: int, seed: int) -> RolloutBatch:
    """Prompts of 16-64 tokens, log-normal responses (median cap / 6, ~4% at the cap)."""
    g = torch.Generator().manual_seed(seed)
    rng = torch.distributions.LogNormal(math.log(cap / 6), 1.0)
    torch.manual_seed(seed)
    response_lens = rng.sample((num,)).round().clamp(1, cap).long()
    prompt_lens = torch.randint(16, 65, (num,), generator=g)
    p, t = int(prompt_lens.max()), int(response_lens.max())
    prompt_mask = torch.arange(p)[None] < prompt_lens[:, None]
    response_mask = torch.arange(t)[None] < response_lens[:, None]
    return RolloutBatch(
        prompt_ids=torch.randint(1, vocab, (num, p), generator=g) * prompt_mask,
        prompt_mask=prompt_mask,
        response_ids=torch.randint(1, vocab, (num, t), generator=g) * response_mask,
        response_mask=response_mask,
        sampler_logprobs=torch.full((num, t), -3.0) * response_mask,
        prompt_index=torch.arange(num),
        finish_reason=tuple("length" if n == cap else "stop" for n in response_lens.tolist()),
        weight_version=0,
    )


def bench_config(models: tuple[Path, Path], kind: str, shape: dict, out_dir: Path):
    from eopd_ray.config import config_from_dict

    budget = shape["micro"] * (64 + shape["cap"])  # the fixed layout's worst case
    return config_from_dict(
        {
            "model": {"student_path": str(models[0]), "teacher_path": str(models[1])},
            "data": {"toy_prompts": 8, "max_prompt_tokens": 64},
            "rollout": {
                "prompts_per_step": shape["sequences"],
                "max_new_tokens": shape["cap"],
                "max_model_len": 64 + shape["cap"],
            },
            "teacher": {
                "top_k": 16,
                "micro_batch_size": shape["micro"],
                "max_tokens_per_micro_batch": budget if kind == "budget" else None,
            },
            "learner": {
                "num_workers": WORLD,
                "zero_stage": 2,
                "lr": 1e-5,
                "lr_schedule": "constant",
                "mini_batch_size": shape["mini_batch"],
                "micro_batch_size": shape["micro"],
                "max_tokens_per_micro_batch": budget if kind == "budget" else None,
                "balance_tokens": kind == "budget",
                "max_sampler_gap": 1e9,  # synthetic sampler log-probs: no sampler-gap stop
            },
            "run": {"output_dir": str(out_dir), "steps": 100},
        }
    )


# ----------------------------------------------------------------------------- padding


def learner_padding(batch: RolloutBatch, plan, budgeted: bool) -> dict[str, float]:
    """Padded fractions of the learner's forwards: backbone positions (each micro-batch is packed
    to its own longest prompt + response) and LM-head rows (the step's response width; under a
    budget only the real response positions reach the head)."""
    p = batch.prompt_mask.sum(1).tolist()
    r = batch.response_mask.sum(1).tolist()
    width = batch.response_ids.shape[1]
    backbone = head = 0
    for update in plan:
        for rank_mbs in update:
            for mb in rank_mbs:
                if not mb:
                    continue
                backbone += len(mb) * max(p[i] + r[i] for i in mb)
                head += sum(r[i] for i in mb) if budgeted else len(mb) * width
    real = sum(p) + sum(r)
    return {"backbone": 1 - real / backbone, "head": 1 - sum(r) / head}


def teacher_padding(batch: RolloutBatch, groups, budgeted: bool) -> dict[str, float]:
    return learner_padding(batch, [[groups]], budgeted)


# ----------------------------------------------------------------------------- learner ranks


def _peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := current RSS


def _peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rank_main(rank: int, port: int, work: str) -> None:
    """One learner rank: every configuration in turn (warm-up + timed steps), times to a file."""
    os.environ.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    from eopd_ray.roles.learner import LearnerWorker

    jobs = torch.load(Path(work) / "jobs.pt", weights_only=False)
    results = {}
    for kind, job in jobs.items():
        worker = LearnerWorker(job["cfg"], rank, WORLD)
        worker.setup("127.0.0.1", port)
        shard, scores, tokens, plan = job["ranks"][rank]
        times, peaks = [], []
        for i in range(job["steps"] + job["warmup"]):
            _peak_reset()
            started = time.perf_counter()
            worker.train_step(shard, scores, tokens, plan)
            if i >= job["warmup"]:  # warm-up steps: allocator growth, first-call work
                times.append(time.perf_counter() - started)
                peaks.append(_peak_mib())
        results[kind] = {"seconds": times, "peak_mib": max(peaks)}
        worker.engine.destroy()
        del worker
    torch.save(results, Path(work) / f"rank{rank}.pt")
    # Leave without the interpreter's teardown: gloo's threads still joinable at exit made
    # C++ call std::terminate (exit -6) in one CI run, after the results were written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_learners(jobs: dict, work: Path) -> dict:
    import torch.multiprocessing as mp

    port = free_port()
    torch.save(jobs, work / "jobs.pt")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(work))) for r in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(1800)
        if proc.exitcode != 0:
            raise SystemExit(f"learner rank exited with {proc.exitcode}")
    return {r: torch.load(work / f"rank{r}.pt", weights_only=False) for r in range(WORLD)}


# ----------------------------------------------------------------------------- main


def fake_scores(batch: RolloutBatch, k: int, vocab: int) -> TeacherScores:
    """Stand-in teacher scores for the learner part (the teacher part is timed on its own)."""
    b, t = batch.response_ids.shape
    g = torch.Generator().manual_seed(1)
    m = batch.response_mask
    return TeacherScores(
        token_logprobs=-torch.rand(b, t, generator=g) * m,
        entropy=torch.rand(b, t, generator=g) * 2 * m,
        topk_ids=(torch.randint(1, vocab, (b, t, k), generator=g) * m[..., None]).int(),
        topk_logprobs=(-torch.rand(b, t, k, generator=g) * 5).sort(-1, True).values * m[..., None],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="cap 128, 32 sequences, 1 step")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--out", help="JSON results (a path or a URI)")
    args = parser.parse_args(argv)
    from eopd_ray.roles.teacher import TeacherWorker
    from eopd_ray.toy.models import ensure_bench_models

    work = Path(tempfile.mkdtemp(prefix="ragged-"))
    models = ensure_bench_models(REPO / "runs" / "bench" / "models")
    if args.quick:  # the same models and length distribution, a shorter cap and batch
        shape = {"sequences": 32, "mini_batch": 16, "micro": 4, "cap": 128}
        args.steps = min(args.steps, 1)
    else:
        shape = {"sequences": 64, "mini_batch": 32, "micro": 4, "cap": 512}
    warmup = 0 if args.quick else 1  # quick: a smoke test, first-call costs included
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(models[0]).vocab_size
    hidden = AutoConfig.from_pretrained(models[0]).hidden_size
    batch = ragged_batch(shape["sequences"], shape["cap"], vocab, seed=0)
    lengths = batch.sequence_lengths
    num_updates = shape["sequences"] // shape["mini_batch"]
    tokens = [
        int(batch.response_mask[u * shape["mini_batch"] : (u + 1) * shape["mini_batch"]].sum())
        for u in range(num_updates)
    ]
    scores = fake_scores(batch, 16, vocab)
    rows: dict[str, dict] = {}
    jobs = {}
    for kind in CONFIGS:
        cfg = bench_config(models, kind, shape, work / kind)
        budgeted = kind == "budget"
        # Teacher: one worker, the whole batch, timed here (nothing else running).
        teacher = TeacherWorker(cfg, 0)
        teacher_times = []
        for i in range(args.steps + warmup):
            started = time.perf_counter()
            teacher.score(batch)
            if i >= warmup:
                teacher_times.append(time.perf_counter() - started)
        groups = teacher._micro_batches(
            teacher._teacher_prompts(batch), teacher._teacher_responses(batch)
        )
        del teacher
        shares = share_step(
            lengths,
            num_updates,
            WORLD,
            micro_batch_size=shape["micro"],
            max_tokens_per_micro_batch=cfg.learner.max_tokens_per_micro_batch,
            balance=cfg.learner.balance_tokens,
            attention_weight=1 / (6 * hidden),
        )
        plan = shares.plan
        ranks = [
            (batch.select(share), scores.select(share), tokens, local)
            for share, local in shares.ranks
        ]
        jobs[kind] = {"cfg": cfg, "steps": args.steps, "warmup": warmup, "ranks": ranks}
        rows[kind] = {
            "config": kind,
            "teacher_s": statistics.median(teacher_times),
            "teacher_padded_fraction": teacher_padding(batch, groups, budgeted),
            "learner_padded_fraction": learner_padding(batch, plan, budgeted),
            "rank_imbalance": shares.imbalance,
            "teacher_micro_batches": len(groups),
            "learner_micro_batches_per_rank": sum(len(u[0]) for u in plan),
        }
    learner = run_learners(jobs, work)
    response_tokens = int(batch.response_mask.sum())
    for kind, row in rows.items():
        per_rank = [learner[r][kind] for r in range(WORLD)]
        row["learner_s"] = max(statistics.median(x["seconds"]) for x in per_rank)
        row["peak_mib_per_rank"] = [x["peak_mib"] for x in per_rank]
        row["student_tokens_per_s"] = response_tokens / (row["teacher_s"] + row["learner_s"])
        row["padded_fraction"] = max(
            max(row["teacher_padded_fraction"].values()),
            max(row["learner_padded_fraction"].values()),
        )
    fixed = rows["fixed"]
    for row in rows.values():
        row["speedup_vs_fixed"] = (fixed["teacher_s"] + fixed["learner_s"]) / (
            row["teacher_s"] + row["learner_s"]
        )
    _print_table(rows, shape, response_tokens)
    if args.out:
        data = {"shape": shape, "response_tokens": response_tokens, "rows": list(rows.values())}
        from eopd_ray.storage.outputs import write_json_output

        where = write_json_output(args.out, data)
        print(f"results: {where}")
    return 0


def _print_table(rows: dict, shape: dict, response_tokens: int) -> None:
    print(
        f"ragged batch: {shape['sequences']} sequences, cap {shape['cap']}, "
        f"{response_tokens} response tokens; 1 teacher, {WORLD} learner ranks (ZeRO-2)"
    )
    header = (
        "| config | teacher pad (backbone / head) | learner pad (backbone / head) | teacher s | "
        "learner s | student tok/s | speedup | rank imbalance | peak MiB per rank |"
    )
    print(header)
    print("|" + "---|" * 9)
    for r in rows.values():
        tp, lp = r["teacher_padded_fraction"], r["learner_padded_fraction"]
        print(
            f"| {r['config']} | {tp['backbone']:.1%} / {tp['head']:.1%} | "
            f"{lp['backbone']:.1%} / {lp['head']:.1%} | {r['teacher_s']:.2f} | "
            f"{r['learner_s']:.2f} | {r['student_tokens_per_s']:.0f} | "
            f"{r['speedup_vs_fixed']:.2f}x | {r['rank_imbalance']:.1%} | "
            f"{' / '.join(f'{m:.0f}' for m in r['peak_mib_per_rank'])} |"
        )


if __name__ == "__main__":
    sys.exit(main())
