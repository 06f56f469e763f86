"""Build the assets of the paper-shaped CPU rehearsal (jobs/configs/rehearsal.yaml).

    python jobs/prepare_rehearsal.py [--root runs/rehearsal/assets] [--seed 0]
    python jobs/distill.py --config jobs/configs/rehearsal.yaml

Writes <root>/student (tied Qwen3, 2 layers, hidden 64), <root>/teacher (untied Qwen3, 3 layers,
hidden 128), both with 151,936 embedding rows and Qwen3's 151,669-token vocabulary layout, and
<root>/math_train.parquet (64 problems). Offline, deterministic, about 3 s; a second call with
the same recipe returns at once (eopd_ray/toy/rehearsal.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eopd_ray.env import set_job_environment

set_job_environment()

from eopd_ray.errors import EopdError  # noqa: E402
from eopd_ray.storage.outputs import local_output_dir  # noqa: E402
from eopd_ray.toy.rehearsal import ensure_rehearsal_assets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the rehearsal student, teacher, prompts.")
    parser.add_argument(
        "--root",
        default="runs/rehearsal/assets",
        help="asset directory (jobs/configs/rehearsal.yaml reads runs/rehearsal/assets)",
    )
    parser.add_argument("--seed", type=int, default=0, help="model init and problems")
    args = parser.parse_args(argv)
    try:
        root = local_output_dir(args.root, "--root", "the rehearsal assets")
    except EopdError as exc:
        parser.error(str(exc))
    started = time.monotonic()
    student, teacher, prompts = ensure_rehearsal_assets(root, seed=args.seed)
    print(f"student: {student}\nteacher: {teacher}\nprompts: {prompts}")
    print(f"ready in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
