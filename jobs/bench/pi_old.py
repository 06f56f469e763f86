"""The learner's share of a step with pi_old from the update's own forward against a separate
pi_old forward first (`learner.old_logprobs_from_update`), interleaved in one run.

    python jobs/bench/pi_old.py [--repeats 4] [--threads 2] [--out FILE]

One LearnerWorker (world size 1, in this process, ZeRO as in bench.yaml) per setting on the bench
student (26M parameters, 32k vocabulary; eopd_ray.toy.models.ensure_bench_models), a synthetic
step of bench.yaml's shape (16 sequences, 64 prompt + 128 response tokens, top-16 teacher
scores), one optimizer update per step. Per repeat, each setting runs once in turn: `separate`
is `recompute_old_logprobs` (what the driver overlaps with teacher scoring) then `train_step`;
`from_update` is `train_step` alone. The first repeat is a warm-up; the table shows the medians
of the rest and their ratio. On 2 cores the separate forward competes with the teacher for the
same cores, so its CPU time is the step time it costs; on a GPU cluster it overlaps instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from eopd_ray.env import set_job_environment  # noqa: E402

set_job_environment()
# The learner's threads (bench.yaml: learner.cpus_per_worker 2), before torch and DeepSpeed read it.
if "--threads" in sys.argv:
    os.environ["OMP_NUM_THREADS"] = sys.argv[sys.argv.index("--threads") + 1]
else:
    os.environ["OMP_NUM_THREADS"] = "2"

import torch  # noqa: E402

from eopd_ray.ports import free_port  # noqa: E402

SETTINGS = {"from_update": True, "separate": False}


def synthetic_step(vocab: int, b: int = 16, p: int = 64, t: int = 128, k: int = 16):
    from eopd_ray.core.wire import RolloutBatch, TeacherScores

    g = torch.Generator().manual_seed(0)
    batch = RolloutBatch(
        prompt_ids=torch.randint(0, vocab, (b, p), generator=g),
        prompt_mask=torch.ones(b, p, dtype=torch.bool),
        response_ids=torch.randint(0, vocab, (b, t), generator=g),
        response_mask=torch.ones(b, t, dtype=torch.bool),
        sampler_logprobs=-torch.rand(b, t, generator=g) * 5,  # random: the gap check is off
        prompt_index=torch.arange(b),
        finish_reason=("length",) * b,
        weight_version=0,
    )
    scores = TeacherScores(
        token_logprobs=-torch.rand(b, t, generator=g) * 5,
        entropy=torch.rand(b, t, generator=g) * 1.6,
        topk_ids=torch.randint(0, vocab, (b, t, k), generator=g, dtype=torch.int32),
        topk_logprobs=(-torch.rand(b, t, k, generator=g) * 4).sort(-1, descending=True).values,
    )
    return batch, scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (bench.yaml: 2)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from transformers import AutoConfig

    from eopd_ray.config import load_config
    from eopd_ray.core.micro_batches import plan_step, rank_share
    from eopd_ray.roles.learner import LearnerWorker
    from eopd_ray.toy.models import ensure_bench_models

    torch.set_num_threads(args.threads)
    student, _ = ensure_bench_models(REPO / "runs" / "bench" / "models")
    port = free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", DS_ACCELERATOR="cpu")  # fmt: skip
    batch, scores = synthetic_step(AutoConfig.from_pretrained(student).vocab_size)
    workers, cfg = {}, None
    for name, from_update in SETTINGS.items():
        cfg = load_config(
            REPO / "jobs" / "configs" / "bench.yaml",
            [
                f"model.student_path={student}",
                "learner.num_workers=1",
                "learner.max_sampler_gap=1e9",
                f"learner.old_logprobs_from_update={str(from_update).lower()}",
            ],
        )
        workers[name] = LearnerWorker(cfg, 0, 1)
        workers[name].setup("127.0.0.1", port)
    budget = cfg.learner.max_tokens_per_micro_batch
    _, plan = rank_share(plan_step(batch.sequence_lengths, 1, 1, 1, budget, balance=True), 0)
    tokens = [batch.num_response_tokens]
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name, worker in workers.items():
            started = time.perf_counter()
            if not SETTINGS[name]:
                worker.recompute_old_logprobs(batch, plan)
            metrics = worker.train_step(batch, scores, tokens, plan)
            times[name].append(time.perf_counter() - started)
            assert metrics[0]["learner/old_logprobs_from_update"] == float(SETTINGS[name])
    median = {name: statistics.median(t[1:] or t) for name, t in times.items()}
    print("| pi_old | learner s per step (median) | ratio |\n| --- | --- | --- |")
    for name in SETTINGS:
        print(f"| {name} | {median[name]:.2f} | {median[name] / median['separate']:.2f} |")
    if args.out:
        args.out.write_text(json.dumps({"times_s": times, "median_s": median}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
