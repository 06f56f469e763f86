"""The served teacher against the in-job one: tokens/s, per-request overhead, bytes on the wire.

    python jobs/bench/served_teacher.py [--quick] [--out results.json]

On the teacher_payload bench shapes (B sequences x T response tokens after a 16-token prompt,
top-K 16, random-init Llama teachers of growing vocabulary, hidden 256, 2 layers) it scores the
same batch with
- the in-job TeacherWorker (in this process, no Ray),
- one replica of the served application through its Ray handle (ServedTeacher, no HTTP),
- the same replica over HTTP, binary (safetensors) and JSON bodies,
and reports tokens/s of each, the round trip of a one-token request (the per-request overhead),
and the request and answer sizes per token in both encodings. A local Ray and Serve start in
their own temp dir, HTTP on a free loopback port.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

_spec = importlib.util.spec_from_file_location(
    "teacher_payload", Path(__file__).with_name("teacher_payload.py")
)
teacher_payload = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(teacher_payload)


def best_rate(fn, tokens: int, repeats: int) -> float:
    fn()  # warm-up
    best = min(_timed(fn) for _ in range(repeats))
    return tokens / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_ms(fn, repeats: int) -> float:
    fn()
    return 1000 * statistics.median(_timed(fn) for _ in range(repeats))


def measure(model_dir: Path, b: int, t: int, k: int, repeats: int, app: str, port: int) -> dict:
    import torch

    from eopd_ray.config import config_from_dict
    from eopd_ray.core.forward import rows_of
    from eopd_ray.core.wire import RolloutBatch
    from eopd_ray.roles.teacher import TeacherWorker
    from eopd_ray.serving.adapter import ServedTeacher
    from eopd_ray.serving.app import ServeSettings, serve_teacher
    from eopd_ray.serving.client import HttpTeacherClient, TeacherClient
    from eopd_ray.serving.codec import (
        answer_to_json,
        encode_answer,
        encode_request,
        request_to_json,
    )
    from eopd_ray.serving.schema import ScoreRequest

    cfg = config_from_dict(
        {
            "model": {"student_path": str(model_dir), "teacher_path": str(model_dir)},
            "data": {"toy_prompts": 8},
            "teacher": {"top_k": k, "micro_batch_size": b, "chunk_positions": 64},
        }
    )
    g = torch.Generator().manual_seed(0)
    batch = RolloutBatch(
        prompt_ids=torch.randint(3, 300, (b, 16), generator=g),
        prompt_mask=torch.ones(b, 16, dtype=torch.bool),
        response_ids=torch.randint(3, 300, (b, t), generator=g),
        response_mask=torch.ones(b, t, dtype=torch.bool),
        sampler_logprobs=torch.zeros(b, t),
        prompt_index=torch.arange(b),
        finish_reason=("length",) * b,
        weight_version=0,
    )
    tokens = b * t
    worker = TeacherWorker(cfg, 0)
    in_job = best_rate(lambda: worker.score(batch), tokens, repeats)

    settings = ServeSettings(name=app, batch_wait_s=0.0, http_port=port)
    url = f"http://127.0.0.1:{port}{settings.route_prefix}"
    serve_teacher(settings, cfg)
    served = ServedTeacher(cfg, TeacherClient(app))
    handle = best_rate(lambda: served.score(batch), tokens, repeats)
    prompts = rows_of(batch.prompt_ids, batch.prompt_mask)
    responses = rows_of(batch.response_ids, batch.response_mask)
    request = ScoreRequest.from_rows(prompts, responses)
    binary, as_json = HttpTeacherClient(url), HttpTeacherClient(url, binary=False)
    http_binary = best_rate(lambda: binary.score(request), tokens, repeats)
    http_json = best_rate(lambda: as_json.score(request), tokens, repeats)

    one = ScoreRequest.from_rows([[5, 6]], [[7]])
    one_batch = batch.select([0]).trimmed()
    one_batch = RolloutBatch(
        prompt_ids=one_batch.prompt_ids[:, :2],
        prompt_mask=one_batch.prompt_mask[:, :2],
        response_ids=one_batch.response_ids[:, :1],
        response_mask=one_batch.response_mask[:, :1],
        sampler_logprobs=one_batch.sampler_logprobs[:, :1],
        prompt_index=one_batch.prompt_index,
        finish_reason=one_batch.finish_reason,
        weight_version=0,
    )
    n = 10 if repeats <= 2 else 30
    overhead = {
        "in_job_ms": median_ms(lambda: worker.score(one_batch), n),
        "handle_ms": median_ms(lambda: served.score(one_batch), n),
        "http_binary_ms": median_ms(lambda: binary.score(one), n),
        "http_json_ms": median_ms(lambda: as_json.score(one), n),
    }
    answer = binary.score(request)
    sizes = {
        "request_binary": len(encode_request(request)),
        "request_json": len(json.dumps(request_to_json(request)).encode()),
        "answer_binary": len(encode_answer(answer)),
        "answer_json": len(json.dumps(answer_to_json(answer)).encode()),
    }
    return {
        "V": worker.vocab_rows,
        "K": k,
        "tokens_per_s": {
            "in_job": in_job,
            "handle": handle,
            "http_binary": http_binary,
            "http_json": http_json,
        },
        "served_vs_in_job": handle / in_job,
        "one_token_request": overhead,
        "bytes_per_token": {key: v / tokens for key, v in sizes.items()},
        "answer_json_vs_binary": sizes["answer_json"] / sizes["answer_binary"],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    import ray
    from ray import serve

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="write the results as JSON (a path or a URI)")
    args = parser.parse_args(argv)
    vocabs = [320] if args.quick else [320, 32000]
    b, t, k = (4, 64, 16) if args.quick else (8, 128, 16)
    temp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp)
    port = free_port()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i, vocab in enumerate(vocabs):
                model = teacher_payload.build_teacher(Path(tmp), vocab, hidden=256, layers=2)
                row = measure(model, b, t, k, 2 if args.quick else 3, f"bench-{i}", port)
                serve.delete(f"bench-{i}")
                rows.append(row)
                print(json.dumps(row, indent=1))
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    if args.out:
        from eopd_ray.storage.outputs import write_json_output

        where = write_json_output(args.out, {"B": b, "T": t, "rows": rows})
        print(f"results: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
