"""Where a job's output options (`--out`, `--root`, `--cache`) point: a local path or a URI.

    store = output_dir(args.out, "--out")        # a RunStorage: local directory or any URI
    store.write_text("results.json", text)
    write_output(args.out, text, "--out")        # one file, at a path or a URI; returns where
    root = local_output_dir(args.root, "--root")  # must be local (models built in place)

Options that take an output take it as a string, never `type=Path`: a Path turns
`s3://bucket/x` into `s3:/bucket/x`, a local folder named `s3:` (issue 33). Imports neither
Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import json
from pathlib import Path

from eopd_ray.storage.run_storage import RunStorage, StorageError, is_uri, redacted


def output_dir(location: str, option: str) -> RunStorage:
    """The directory `option` names, opened (a URI that pyarrow cannot open fails now, before
    any work, naming `option`)."""
    if not is_uri(location):
        location = str(Path(location).expanduser().resolve())
    store = RunStorage(location, key=option)
    _ = store.fs
    return store


def _parent_and_name(location: str) -> tuple[str, str]:
    """`s3://b/x/out.json?scheme=http` -> (`s3://b/x?scheme=http`, `out.json`)."""
    if not is_uri(location):
        path = Path(location).expanduser().resolve()
        return str(path.parent), path.name
    base, sep, query = location.partition("?")
    parent, _, name = base.rpartition("/")
    return f"{parent}{sep}{query}", name


def write_output(location: str, data: str | bytes, option: str) -> str:
    """`data` written, complete or absent, to the file `location` (a path or a URI); returns
    where it went, as shown to a user (credentials masked)."""
    parent, name = _parent_and_name(location)
    store = output_dir(parent, option)
    store.write_bytes(name, data.encode("utf-8") if isinstance(data, str) else data)
    return store.show(name)


def write_json_output(location: str, data: object, option: str = "--out") -> str:
    """`data` as indented JSON, written like `write_output` (a benchmark's or a job's --out)."""
    return write_output(location, json.dumps(data, indent=2) + "\n", option)


def read_input(location: str, option: str) -> bytes:
    """The file `location` (a path or a URI)."""
    parent, name = _parent_and_name(location)
    store = output_dir(parent, option)
    try:
        return store.read_bytes(name)
    except OSError as exc:
        raise StorageError(f"{option} {store.show(name)}: cannot read it ({exc})") from None


def local_output_dir(location: str, option: str, what: str) -> Path:
    """A directory that must be on this machine (`what` is built in place there): a URI is
    refused, naming `option`."""
    if is_uri(location):
        raise StorageError(
            f"{option} {redacted(location)!r} is a URI, but {what} must be a local directory: "
            f"give a local path (and copy the result to the object store afterwards)"
        )
    return Path(location).expanduser()
