"""A hub id (`org/name[@revision]`) as a snapshot directory in this node's Hugging Face cache.

    hub_snapshot("Qwen/Qwen3-1.7B-Base", "<commit>", spec, "model.student_path", SourceError)
    # -> <HF_HUB_CACHE>/models--Qwen--Qwen3-1.7B-Base/snapshots/<commit>

A pinned commit already complete in the cache is used at once, without asking the hub (a node
without hub access and without `HF_HUB_OFFLINE=1` otherwise spent minutes in huggingface_hub's
retries, once per process and model). An unpinned id is resolved with one hub call bounded by
`HF_HUB_ETAG_TIMEOUT` (10 s): when the hub does not answer and the cache holds the revision, the
cached commit is used and a warning says to set `HF_HUB_OFFLINE=1`. An id the cache and the hub
do not know is answered with the closest ids in the cache. Imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import difflib
import logging
import re
import time
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _cached(repo: str, revision: str | None) -> Path | None:
    """The snapshot of `revision` (a commit, or a branch the cache has a ref for) if the cache
    holds it complete; never asks the hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def cached_repos(cache: Path) -> list[str]:
    """The ids (`org/name`) of the models in the cache."""
    names = [p.name for p in cache.glob("models--*") if p.is_dir()]
    return sorted(n.removeprefix("models--").replace("--", "/", 1) for n in names)


def close_matches(repo: str, cache: Path) -> str:
    """ " (did you mean 'a/b' or 'a/c'? in the cache)", or "" when nothing is close."""
    repos = cached_repos(cache)
    lowered = {r.lower(): r for r in repos}
    found = difflib.get_close_matches(repo.lower(), list(lowered), n=3, cutoff=0.6)
    if not found:
        return ""
    return " (did you mean " + " or ".join(repr(lowered[f]) for f in found) + "? in the cache)"


def _resolve(repo: str, revision: str | None, key: str, spec: str, cache: Path) -> str | None:
    """The commit of `revision` on the hub; the cached one (with a warning) when the hub does not
    answer; None when the hub does not answer and the cache does not have it."""
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    started = time.monotonic()
    try:
        info = HfApi().repo_info(repo, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
        return info.sha
    except (httpx2.TransportError, OfflineModeIsEnabled, ConnectionError) as exc:
        cached = _cached(repo, revision)
        if cached is None:
            return None
        log.warning(
            "%s = %s: the Hugging Face hub did not answer (%s, %.0f s); using the commit of "
            "%r in this node's cache %s, %s. On nodes without hub access set HF_HUB_OFFLINE=1: "
            "the cache is then read at once, with no hub call (and pin the id, org/name@<commit>)",
            key,
            spec,
            type(exc).__name__,
            time.monotonic() - started,
            revision or "main",
            cache,
            cached.name,
        )
        return cached.name


def hub_snapshot(
    repo: str, revision: str | None, spec: str, key: str, error: type[Exception]
) -> Path:
    """The snapshot directory of `repo` at `revision` (None: main), downloaded into this node's
    cache if needed (one process per node downloads, under a file lock). Failures raise `error`
    naming `key` and `spec` (as the user gave it)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    cache = Path(constants.HF_HUB_CACHE)
    lock_dir = cache / ".eopd-locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / (repo.replace("/", "--") + ".lock"))):
        commit = revision if revision and _COMMIT.match(revision) else None
        try:
            if commit is None and not hub_offline():
                commit = _resolve(repo, revision, key, spec, cache)
            if commit is not None and (cached := _cached(repo, commit)) is not None:
                return cached
            return Path(snapshot_download(repo, revision=commit or revision))
        except LocalEntryNotFoundError:
            offline = hub_offline()
            why = "HF_HUB_OFFLINE is set (no download)" if offline else "the hub is out of reach"
            pin = f" --revision {revision}" if revision else ""
            raise error(
                f"{key} = {spec!r}: not in the Hugging Face cache {cache} and {why}"
                f"{close_matches(repo, cache)}. Download it beforehand on every node (`hf "
                f"download {repo}{pin}` with the same HF_HOME), put the cache on a volume the "
                "nodes share, or give a local directory or an object-store URI instead"
            ) from None
        except (HfHubHTTPError, OSError, ValueError) as exc:
            raise error(
                f"{key} = {spec!r}: cannot fetch it from the Hugging Face hub ({exc})"
                f"{close_matches(repo, cache)}; check the id and revision, and HF_TOKEN for a "
                "gated or private model"
            ) from None
