"""What a checkpoint after every step costs (`run.checkpoint_every: 1`), on a local disk and on
an object store, with the learners' upload blocking the next step or running beside it.

    python jobs/bench/checkpoint_cost.py [--config bench|tiny] [--steps 6] [--out FILE]

For each mode it starts the real pipeline on the embedded local Ray and times `run()` over
`--steps` steps (start-up excluded); the cost of a mode is its extra wall time per step over
the run without checkpoints, also per GB of checkpoint (the learner state plus the driver's
part, as written). The object store is S3 spoken to over HTTP: moto's server in this process on
a loopback port (its CPU use competes with the run on a small machine: an upper bound).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the S3 endpoint of the tests (moto's server)
from eopd_ray.env import set_job_environment  # noqa: E402

set_job_environment()

from throughput import config_for  # noqa: E402  (jobs/bench/throughput.py)

MODES = {
    "none": ("local", ["run.checkpoint_every=0"]),
    "local disk": ("local", ["run.checkpoint_every=1"]),
    "s3 blocking": ("s3", ["run.checkpoint_every=1", "run.checkpoint_upload=blocking"]),
    "s3 background": ("s3", ["run.checkpoint_every=1", "run.checkpoint_upload=background"]),
}


def timed_run(cfg) -> float:
    """Wall seconds of pipeline.run() (start-up excluded)."""
    from eopd_ray.driver.pipeline import Pipeline

    pipeline = Pipeline(cfg)
    try:
        pipeline.start()
        started = time.perf_counter()
        pipeline.run(progress="lines")
        wall = time.perf_counter() - started
    finally:
        pipeline.shutdown()
    return wall


def checkpoint_bytes(store_uri: str) -> int:
    """Bytes of the newest complete checkpoint."""
    import pyarrow.fs as pafs

    from eopd_ray.storage import checkpoint
    from eopd_ray.storage.run_storage import RunStorage

    store = RunStorage(store_uri)
    latest = checkpoint.latest(store)
    found = store.fs.get_file_info(pafs.FileSelector(store.path(latest.rel), recursive=True))
    return sum(f.size for f in found if f.type == pafs.FileType.File)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The cost of a checkpoint after every step.")
    parser.add_argument("--config", choices=["bench", "tiny"], default="bench")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", help="write the results as JSON (a path or a URI)")
    args = parser.parse_args(argv)
    from s3_endpoint import S3Endpoint

    results = []
    with tempfile.TemporaryDirectory(prefix="eopd-ckpt-bench-") as tmp, S3Endpoint() as s3:
        for mode, (where, overrides) in MODES.items():
            out = (
                s3.uri(f"runs/{mode.replace(' ', '-')}")
                if where == "s3"
                else f"{tmp}/{mode.replace(' ', '-')}"
            )
            cfg = config_for(args.config, Path(tmp) / "unused", args.steps, overrides)
            cfg = replace(cfg, run=replace(cfg.run, output_dir=out, resume="never"))
            print(f"{mode}: {args.steps} steps ...", flush=True)
            wall = timed_run(cfg)
            size = checkpoint_bytes(out) if mode != "none" else 0
            results.append(
                {"mode": mode, "wall_s": wall, "step_s": wall / args.steps, "bytes": size}
            )
    base = results[0]["step_s"]
    for r in results:
        r["cost_per_step_s"] = r["step_s"] - base
        r["cost_frac"] = r["cost_per_step_s"] / base
        r["s_per_gb"] = r["cost_per_step_s"] / (r["bytes"] / 1e9) if r["bytes"] else 0.0
    print(f"\n{args.config} config, {args.steps} steps, checkpoint after every step")
    print(f"{'mode':<15} {'s/step':>8} {'cost/step':>10} {'cost %':>7} {'ckpt MB':>8} {'s/GB':>7}")
    for r in results:
        print(
            f"{r['mode']:<15} {r['step_s']:8.2f} {r['cost_per_step_s']:10.2f} "
            f"{100 * r['cost_frac']:6.1f}% {r['bytes'] / 1e6:8.1f} {r['s_per_gb']:7.1f}"
        )
    if args.out:
        from eopd_ray.storage.outputs import write_json_output

        where = write_json_output(args.out, {"config": args.config, "results": results})
        print(f"results: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
