"""Would the teacher scoring each response's first positions while the rollout decodes the rest
pay on this machine? A measurement for a change not built (issue 36's lever left), as a table.

    python jobs/bench/prefix_overlap.py [--chunks 32 64] [--out FILE]

Bench models (eopd_ray.toy.models.ensure_bench_models) at bench.yaml's shape: 16 sequences of 18
prompt + 128 response tokens (random ids: this measures time only). Measured:

- decode: the real rollout engine (`roles.rollout_engines.VllmEngine`, one thread) in a child
  process, 16 x 128 tokens per call, alone and again while this process scores prefixes beside
  it on one thread: does the decode slow down when the core it leaves idle works?
- teacher (transformers, fp32, the bench teacher) in this process: the whole sequences on 2
  threads (what the synchronous step runs after the decode) and on 1; per chunk C, the prompt +
  first C response positions on one thread beside the decode (what the idle core could do) and
  the remaining positions on 2 threads with the prefix's KV cache. The per-position reduction
  is the teacher's (fp32 LM head, log-softmax, entropy, top-16, 256 positions at a time) written
  out here: `TeacherWorker` has no prefix mode.

Per chunk: sync = decode alone + whole on 2 threads; overlapped = max(decode beside, the time C
positions exist (C / 128 of the decode) + the prefix beside it) + the rest on 2 threads; gain =
sync - overlapped. Medians of the repeats; 2 shared cores are noisy, compare within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from eopd_ray.env import set_job_environment  # noqa: E402

set_job_environment()

PROMPT, RESPONSE, SEQUENCES, TOP_K = 18, 128, 16, 16


def decode_child(calls: int) -> None:
    """In the child: build the bench student's engine, then time `calls` decodes (one line each,
    `decode <seconds>`); the first is a warm-up the parent does not count."""
    import torch

    from eopd_ray.config import load_config
    from eopd_ray.roles.rollout_engines import Sampling, VllmEngine
    from eopd_ray.toy.models import ensure_bench_models

    student, teacher = ensure_bench_models(REPO / "runs" / "bench" / "models")
    cfg = load_config(
        REPO / "jobs" / "configs" / "bench.yaml",
        [f"model.student_path={student}", f"model.teacher_path={teacher}"],
    )
    engine = VllmEngine(cfg, seed=0)
    sampling = Sampling.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 30000, (PROMPT,), generator=g).tolist() for _ in range(16)]
    for _ in range(calls):
        started = time.perf_counter()
        engine.generate(prompts, sampling, list(range(SEQUENCES)))
        print(f"decode {time.perf_counter() - started:.4f}", flush=True)


class Teacher:
    """The bench teacher with the scoring reduction, whole or as prefix + rest."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(100, 30000, (SEQUENCES, PROMPT + RESPONSE), generator=g)

    def _reduce(self, hidden) -> None:
        head = self.model.lm_head.weight
        for chunk in hidden.reshape(-1, hidden.shape[-1]).split(256):
            logp = (chunk @ head.T).log_softmax(-1)
            (logp.exp() * logp).sum(-1)  # entropy
            logp.topk(TOP_K, -1)

    def whole(self, threads: int) -> float:
        torch = self.torch
        torch.set_num_threads(threads)
        started = time.perf_counter()
        with torch.no_grad():
            hidden = self.model.model(input_ids=self.ids).last_hidden_state
            self._reduce(hidden[:, PROMPT - 1 : -1])  # the positions predicting response tokens
        return time.perf_counter() - started

    def prefix(self, chunk: int, threads: int):
        """(seconds, cache): prompt + the first `chunk` response positions."""
        from transformers import DynamicCache

        torch = self.torch
        torch.set_num_threads(threads)
        started = time.perf_counter()
        cache = DynamicCache()
        with torch.no_grad():
            out = self.model.model(
                input_ids=self.ids[:, : PROMPT + chunk], past_key_values=cache, use_cache=True
            )
            self._reduce(out.last_hidden_state[:, PROMPT - 1 :])
        return time.perf_counter() - started, cache

    def rest(self, chunk: int, cache, threads: int) -> float:
        torch = self.torch
        torch.set_num_threads(threads)
        started = time.perf_counter()
        positions = torch.arange(PROMPT + chunk, PROMPT + RESPONSE)[None].expand(SEQUENCES, -1)
        with torch.no_grad():
            out = self.model.model(
                input_ids=self.ids[:, PROMPT + chunk :],
                past_key_values=cache,
                use_cache=True,
                position_ids=positions,
            )
            self._reduce(out.last_hidden_state[:, :-1])  # the last token predicts nothing
        return time.perf_counter() - started


def decodes(calls: int, beside=None) -> tuple[list[float], list[float]]:
    """Decode times of a child's calls after its warm-up; with `beside()`, run it in a loop in
    this process while they decode and return its times too."""
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1")
    child = subprocess.Popen(
        [sys.executable, __file__, "--decode-child", str(calls + 1)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    times: list[float] = []

    def read() -> None:
        for line in child.stdout:
            if line.startswith("decode "):
                times.append(float(line.split()[1]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while not times and child.poll() is None:  # the engine starts, then the warm-up call
        time.sleep(0.05)
    beside_times = []
    while beside is not None and reader.is_alive():
        beside_times.append(beside())
    reader.join()
    if child.wait() != 0 or len(times) != calls + 1:
        raise RuntimeError(f"the decode child failed (exit {child.returncode}, {len(times)} calls)")
    return times[1:], beside_times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--calls", type=int, default=4, help="timed decodes per measurement")
    parser.add_argument("--out", help="JSON results (a path or a URI)")
    parser.add_argument("--decode-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.decode_child:
        decode_child(args.decode_child)
        return 0
    from eopd_ray.toy.models import ensure_bench_models

    _, teacher_path = ensure_bench_models(REPO / "runs" / "bench" / "models")
    teacher = Teacher(teacher_path)
    teacher.whole(2)  # warm-up
    whole_2 = statistics.median(teacher.whole(2) for _ in range(3))
    whole_1 = teacher.whole(1)
    alone, _ = decodes(args.calls)
    decode_alone = statistics.median(alone)
    rows = []
    for chunk in args.chunks:
        beside, prefixes = decodes(args.calls, lambda c=chunk: teacher.prefix(c, 1)[0])
        rest = statistics.median(teacher.rest(chunk, teacher.prefix(chunk, 2)[1], 2) for _ in "ab")
        decode_beside, prefix_1 = statistics.median(beside), statistics.median(prefixes)
        sync = decode_alone + whole_2
        overlapped = max(decode_beside, chunk / RESPONSE * decode_beside + prefix_1) + rest
        rows.append(
            {
                "chunk": chunk,
                "decode_alone_s": decode_alone,
                "decode_beside_s": decode_beside,
                "teacher_whole_2_threads_s": whole_2,
                "teacher_whole_1_thread_s": whole_1,
                "prefix_1_thread_beside_s": prefix_1,
                "rest_2_threads_s": rest,
                "sync_s": sync,
                "overlapped_s": overlapped,
                "gain_s": sync - overlapped,
            }
        )
    print(
        "| first chunk | decode alone | decode beside | whole, 2 threads | prefix, 1 thread beside "
        "| rest, 2 threads | decode + teacher, sync | overlapped | gain |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['chunk']} | {r['decode_alone_s']:.2f} | {r['decode_beside_s']:.2f} | "
            f"{r['teacher_whole_2_threads_s']:.2f} | {r['prefix_1_thread_beside_s']:.2f} | "
            f"{r['rest_2_threads_s']:.2f} | {r['sync_s']:.2f} | {r['overlapped_s']:.2f} | "
            f"{r['gain_s']:+.2f} |"
        )
    print(f"(the whole score on one thread: {whole_1:.2f} s)")
    if args.out:
        from eopd_ray.storage.outputs import write_json_output

        write_json_output(args.out, {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
