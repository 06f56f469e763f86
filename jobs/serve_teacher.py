"""Serve a job config's teacher as a Ray Serve application that many jobs share; blocks until
Ctrl-C (the application stays up on a cluster joined through RAY_ADDRESS: `serve delete`).

    python jobs/serve_teacher.py --config jobs/configs/tiny.yaml [key.path=value ...] \
        [--name teacher] [--min-replicas 1] [--max-replicas 2] [--port 8000] [--host 127.0.0.1]

The same as `serve run eopd_ray.serving.app:build_app config=jobs/configs/tiny.yaml`. Without
RAY_ADDRESS it starts a local Ray on 127.0.0.1. A --host beyond loopback needs the token in
$EOPD_TEACHER_TOKEN. docs/running.md, "Sharing one teacher between jobs".
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="a job YAML naming the teacher")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides of --config")
    parser.add_argument("--name", default="teacher", help="the application's name")
    parser.add_argument("--min-replicas", type=int, default=1)
    parser.add_argument("--max-replicas", type=int, default=1)
    parser.add_argument("--host", default="127.0.0.1", help="where Serve's HTTP proxy listens")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)

    import ray

    from eopd_ray.serving.app import ServeSettings, serve_teacher

    settings = ServeSettings(
        config=args.config,
        overrides=tuple(args.overrides),
        name=args.name,
        route_prefix=f"/{args.name}",
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        http_host=args.host,
        http_port=args.port,
    )
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        ray.init(address="local", include_dashboard=False)
    handle = serve_teacher(settings)
    identity = handle.describe.remote().result(timeout_s=600)
    print(f"serving {identity.model} as {args.name!r}: handle serve.get_app_handle({args.name!r}),")
    print(f"HTTP http://{args.host}:{args.port}/{args.name}/score (identity: .../identity)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
