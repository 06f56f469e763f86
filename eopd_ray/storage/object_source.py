"""Object-store sources: a file or directory at a `pyarrow.fs` URI (`s3://`, `gs://`, `hdfs://`,
...) pinned to its listing and copied once per node into `EOPD_CACHE`, and the cache's layout
(manifests beside copies) that storage/gguf_source.py shares.

    spec = pin_uri("s3://bucket/models/student")  # -> "<uri>#listing=<digest>" (driver)
    fetch_uri(spec)                               # a node-local copy (any process)
    local_file("s3://bucket/aime24.jsonl?endpoint_override=127.0.0.1:9000&scheme=http")

storage/sources.py says when each kind of source is used and how pins protect a run; this module
is the part both it and the GGUF source build on (neither is imported here).

Imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs
from filelock import FileLock

from eopd_ray.errors import EopdError
from eopd_ray.storage.run_storage import endpoint_hint, is_uri, redacted

log = logging.getLogger(__name__)


class SourceError(EopdError):
    """A model or data file cannot be found or fetched; names it, where it looked, what to do."""


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


def local_file(spec: str, key: str = "file") -> str:
    """A data file (prompts, a benchmark) as a local path on this node."""
    if not is_uri(spec):
        return spec
    return str(fetch_uri(spec, key) / posix_name(spec.split("?")[0]))
