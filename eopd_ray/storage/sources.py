"""Where models and data come from: a local path, a Hugging Face hub id, or an object-store URI.

    spec = pin_model("Qwen/Qwen3-1.7B-Base")     # -> "Qwen/Qwen3-1.7B-Base@<commit>" (driver)
    local_model_dir(spec)                        # a local directory on this node (any process)
    local_file("s3://bucket/aime24.jsonl?endpoint_override=127.0.0.1:9000&scheme=http")

Three ways to give `model.student_path` / `model.teacher_path` (and `jobs/evaluate.py --model`):

- a local directory, as it is (on a cluster: on a volume every node mounts);
- a hub id `org/name`, optionally pinned `org/name@revision`: `huggingface_hub.snapshot_download`
  into the Hugging Face cache of each node (`HF_HOME` / `HF_HUB_CACHE`; `HF_TOKEN` and
  `HF_HUB_OFFLINE` are honoured as everywhere in the HF stack). The driver pins an unpinned id
  to the commit it resolves, so every worker and a resumed run load the same weights;
- any `pyarrow.fs` URI (`s3://`, `gs://`, `hdfs://`, ...; query parameters such as
  `endpoint_override` are pyarrow's): copied once per node into `EOPD_CACHE` (default
  `~/.cache/eopd-ray`). The driver pins a model URI to its listing (every file's name, size
  and modification time) as `<uri>#listing=<digest>`; a worker that loads it later (a restart,
  a new node) refuses objects that changed since, unless its node holds the pinned copy, and a
  resume compares the pin with the checkpoint's (eopd_ray.storage.checkpoint);
- a `.gguf` file (a local path or a URI): converted once per node into a HF model directory in
  `EOPD_CACHE`, pinned to the file's sha256 (`<path>#sha256=<hex>`; storage/gguf_source.py).

Every worker on a node resolves the same spec; a file lock makes the first one download and the
others wait and reuse it. A download goes to a temporary directory renamed into place only when
every file has the size the store lists, and a manifest (the listing) is written beside it last;
a copy whose manifest or sizes do not match the store's listing (partial, damaged or outdated)
is never used: it is fetched again.

Imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
from filelock import FileLock

from eopd_ray.config import Config
from eopd_ray.errors import EopdError
from eopd_ray.storage.run_storage import endpoint_hint, is_uri, redacted

# `org/name` or `org/name@revision`: one slash, no scheme (a URI) and no leading `.` or `/`.
log = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class SourceError(EopdError):
    """A model or data file cannot be found or fetched; names it, where it looked, what to do."""


def kind_of(spec: str) -> str:
    """ "gguf", "uri", "local" or "hub". An existing local path wins over a hub id of the same
    shape; a `.gguf` file (local or a URI) is "gguf"."""
    from eopd_ray.storage.gguf_source import is_gguf

    if is_gguf(spec):
        return "gguf"
    if is_uri(spec):
        return "uri"
    if Path(spec.split("@")[0]).exists() or not _HUB_ID.match(_without_trailing_slash(spec)):
        return "local"
    return "hub"


def _without_trailing_slash(spec: str) -> str:
    """`org/name/` (a shell's completion) is the hub id `org/name`."""
    repo, at, revision = spec.partition("@")
    return f"{repo.rstrip('/')}{at}{revision}"


def split_hub_id(spec: str) -> tuple[str, str | None]:
    repo, _, revision = _without_trailing_slash(spec).partition("@")
    return repo, revision or None


# ----------------------------------------------------------------------------- hub ids


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hub_snapshot(spec: str, key: str) -> Path:
    """The snapshot directory of hub id `spec` in this node's HF cache, downloaded if needed
    (a pinned commit the cache holds is used without asking the hub: storage/hub_snapshot.py)."""
    from eopd_ray.storage.hub_snapshot import hub_snapshot

    repo, revision = split_hub_id(spec)
    return hub_snapshot(repo, revision, spec, key, SourceError)


def pin_model(spec: str, key: str = "model") -> str:
    """A hub id pinned to the commit this node resolves (`org/name@<sha>`), a GGUF file to its
    sha256; other specs as given."""
    if kind_of(spec) == "gguf":
        from eopd_ray.storage.gguf_source import pin_gguf

        return pin_gguf(spec, key)
    if kind_of(spec) != "hub":
        return spec
    repo, _ = split_hub_id(spec)
    pinned = f"{repo}@{_hub_snapshot(spec, key).name}"  # the snapshot directory is the commit
    if pinned != spec:
        log.info("%s = %s: pinned to %s", key, spec, pinned)
    return pinned


# ----------------------------------------------------------------------------- object stores


def cache_root() -> Path:
    return Path(os.environ.get("EOPD_CACHE") or Path.home() / ".cache" / "eopd-ray")


def _listing(fs: pafs.FileSystem, path: str) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns]} of a file or of every file below a directory."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return {posix_name(path): [info.size, info.mtime_ns or 0]}
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(path)
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    root = path.rstrip("/") + "/"
    return {
        f.path[len(root) :]: [f.size, f.mtime_ns or 0]
        for f in found
        if f.type == pafs.FileType.File
    }


_PIN = re.compile(r"^(?P<uri>.+)#listing=(?P<digest>[0-9a-f]{16})$")


def split_uri_pin(spec: str) -> tuple[str, str | None]:
    """(`uri`, listing digest) of `<uri>#listing=<digest>`; (`spec`, None) when unpinned."""
    match = _PIN.match(spec)
    return (match["uri"], match["digest"]) if match else (spec, None)


def listing_digest(listing: dict[str, list[int]]) -> str:
    """What a pin records: a digest of every file's relative name, size and mtime."""
    return hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]


def _list_uri(uri: str, key: str) -> tuple[pafs.FileSystem, str, dict[str, list[int]]]:
    shown = redacted(uri)  # what messages may show: no credentials from the query
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
        listing = _listing(fs, path)
    except FileNotFoundError:
        raise SourceError(f"{key} = {shown!r}: nothing there (no such file or directory)") from None
    except (OSError, ValueError) as exc:
        raise SourceError(
            f"{key} = {shown!r}: cannot list it ({exc}); check the URI, its endpoint and the "
            "credentials (the standard environment variables, e.g. AWS_ACCESS_KEY_ID)"
            f"{endpoint_hint(uri)}"
        ) from None
    if not listing:
        raise SourceError(f"{key} = {shown!r}: an empty directory")
    return fs, path, listing


def _changed_since_pinned(uri: str, key: str, pin: str, now: str) -> SourceError:
    return SourceError(
        f"{key} = {redacted(uri)!r}: the objects there changed since the run pinned them "
        f"(listing {pin}, now {now}: a file added, removed, resized or rewritten), so this "
        "worker would load other weights than the rest of the run. Restore the objects the run "
        "started with, or start a new run; a resumed run takes the objects there now only with "
        f"run.allow_config_change=true (and {key} without its #listing=... suffix)"
    )


def pin_uri(spec: str, key: str = "model") -> str:
    """`<uri>#listing=<digest>` of the objects at `spec` now; a pinned `spec` is checked and
    returned as it is (SourceError when its objects changed)."""
    uri, pin = split_uri_pin(spec)
    now = listing_digest(_list_uri(uri, key)[2])
    if pin is not None and pin != now:
        raise _changed_since_pinned(uri, key, pin, now)
    if pin is None:
        log.info("%s = %s: pinned to its listing %s", key, redacted(uri), now)
    return f"{uri}#listing={now}"


def posix_name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def manifest_of(local: Path) -> Path:
    """Beside the copy, not in it: a model directory is copied on as a whole (the HF export)."""
    return local.with_name(local.name + ".manifest.json")


def _matches(local: Path, listing: dict[str, list[int]]) -> bool:
    """A complete copy of exactly this listing: the manifest and every file's size agree."""
    try:
        if json.loads(manifest_of(local).read_text()) != listing:
            return False
    except (OSError, ValueError):
        return False
    return all(
        (local / rel).is_file() and (local / rel).stat().st_size == size
        for rel, (size, _) in listing.items()
    )


def _cached_pinned(target: Path, pin: str) -> bool:
    """The node's copy is the pinned listing's, whole (the store may hold other objects now)."""
    try:
        listing = json.loads(manifest_of(target).read_text())
    except (OSError, ValueError):
        return False
    return listing_digest(listing) == pin and _matches(target, listing)


def fetch_uri(spec: str, key: str = "source") -> Path:
    """A node-local copy of the file or directory at `spec`: a directory holding the file(s).
    A pinned `spec` (`pin_uri`) loads only the objects it was pinned to."""
    uri, pin = split_uri_pin(spec)
    shown = redacted(uri)
    fs, path, listing = _list_uri(uri, key)
    base = uri.split("?")[0].rstrip("/")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = cache_root() / "objects" / f"{posix_name(base)}-{digest}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        now = listing_digest(listing)
        if pin is not None and pin != now:
            if _cached_pinned(target, pin):
                log.warning("%s: the store changed, using this node's pinned copy", key)
                return target
            raise _changed_since_pinned(uri, key, pin, now)
        if _matches(target, listing):
            return target
        partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
        try:
            is_file = fs.get_file_info(path).type == pafs.FileType.File
            for rel in listing:
                src = path if is_file else f"{path.rstrip('/')}/{rel}"
                dst = partial / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(
                    src,
                    str(dst),
                    source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem(),
                )
            short = [
                f"{rel}: {(partial / rel).stat().st_size if (partial / rel).exists() else 'none'}"
                f" of {size} bytes"
                for rel, (size, _) in listing.items()
                if not (partial / rel).is_file() or (partial / rel).stat().st_size != size
            ]
            if short:
                raise OSError(f"copied files differ from the store's listing: {short[:3]}")
            manifest_of(target).unlink(missing_ok=True)  # stale until the copy is in place
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
            manifest_of(target).write_text(json.dumps(listing, sort_keys=True))
            total = sum(size for size, _ in listing.values())
            log.info(
                "%s: downloaded %d file(s), %.1f MB, to %s", key, len(listing), total / 1e6, target
            )
        except (OSError, ValueError) as exc:
            raise SourceError(
                f"{key} = {shown!r}: download to {target} failed ({exc}); nothing partial is kept, "
                "the next start downloads it again"
            ) from None
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- for the config


def local_model_dir(spec: str, key: str = "model", dtype: str = "float32") -> str:
    """`spec` as a local model directory on this node (downloading it once per node; a GGUF
    file converted once per node to `dtype`)."""
    kind = kind_of(spec)
    if kind == "gguf":
        from eopd_ray.storage.gguf_source import gguf_model_dir

        return str(gguf_model_dir(spec, key, dtype))
    if kind == "uri":
        return str(fetch_uri(spec, key))
    if kind == "hub":
        return str(_hub_snapshot(spec, key))
    return spec


def local_file(spec: str, key: str = "file") -> str:
    """A data file (prompts, a benchmark) as a local path on this node."""
    if not is_uri(spec):
        return spec
    return str(fetch_uri(spec, key) / posix_name(spec.split("?")[0]))


def pin_models(cfg: Config, resumed: Callable[[], Config | None] = lambda: None) -> Config:
    """`cfg` with hub ids pinned to a commit, URIs to their listing (`pin_uri`) and GGUF files to
    their sha256 (`gguf_source.pin_gguf`), so that every
    worker, started now or later, loads the same weights. For a hub id without a revision, the
    commit the run being resumed (`resumed()`: its config, or None) used for the same
    repository, else the one resolved now. A URI is pinned to the objects there now: a resume
    compares that pin with the checkpoint's (checkpoint.check_compatible). Local paths are left
    as they are."""
    m = cfg.model
    paths = {}
    pinned: Config | None = None
    looked = False  # the resumed run's config is read once, and only for a hub id
    for name in ("student_path", "teacher_path"):
        spec = getattr(m, name)
        if kind_of(spec) == "uri":
            paths[name] = pin_uri(spec, f"model.{name}")
        if kind_of(spec) == "gguf":
            paths[name] = pin_model(spec, f"model.{name}")  # the file's sha256
        if kind_of(spec) != "hub":
            continue
        if not looked:
            pinned, looked = resumed(), True
        before = getattr(pinned.model, name) if pinned is not None else ""
        repo, revision = split_hub_id(spec)
        if revision is None and split_hub_id(before)[0] == repo and "@" in before:
            spec = before  # resume with the weights the run started with
        paths[name] = pin_model(spec, f"model.{name}")
    if not paths:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(m, **paths))


def with_local_models(cfg: Config) -> Config:
    """`cfg` with both models as local directories on this node (what a worker loads)."""
    m = cfg.model
    model = dataclasses.replace(
        m,
        student_path=local_model_dir(m.student_path, "model.student_path", m.dtype),
        teacher_path=local_model_dir(m.teacher_path, "model.teacher_path", m.dtype),
    )
    return dataclasses.replace(cfg, model=model)


def with_local_paths(cfg: Config) -> Config:
    """`cfg` with its models, prompt file and benchmark files local to this node (the driver)."""
    d, e = cfg.data, cfg.eval
    data = dataclasses.replace(d, train_path=local_file(d.train_path, "data.train_path"))
    benchmarks = [local_file(b, "eval.benchmarks") for b in e.benchmarks]
    return dataclasses.replace(
        with_local_models(cfg), data=data, eval=dataclasses.replace(e, benchmarks=benchmarks)
    )
