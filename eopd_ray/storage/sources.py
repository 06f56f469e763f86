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

Object-store copies and pins are storage/object_source.py's; this module picks the source.

Every worker on a node resolves the same spec; a file lock makes the first one download and the
others wait and reuse it. A download goes to a temporary directory renamed into place only when
every file has the size the store lists, and a manifest (the listing) is written beside it last;
a copy whose manifest or sizes do not match the store's listing (partial, damaged or outdated)
is never used: it is fetched again.

Imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from pathlib import Path

from eopd_ray.config import Config
from eopd_ray.storage.gguf_source import gguf_model_dir, is_gguf, pin_gguf
from eopd_ray.storage.object_source import SourceError, fetch_uri, local_file, pin_uri
from eopd_ray.storage.run_storage import is_uri

# `org/name` or `org/name@revision`: one slash, no scheme (a URI) and no leading `.` or `/`.
log = logging.getLogger(__name__)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def kind_of(spec: str) -> str:
    """ "gguf", "uri", "local" or "hub". An existing local path wins over a hub id of the same
    shape; a `.gguf` file (local or a URI) is "gguf"."""
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
        return pin_gguf(spec, key)
    if kind_of(spec) != "hub":
        return spec
    repo, _ = split_hub_id(spec)
    pinned = f"{repo}@{_hub_snapshot(spec, key).name}"  # the snapshot directory is the commit
    if pinned != spec:
        log.info("%s = %s: pinned to %s", key, spec, pinned)
    return pinned


# ----------------------------------------------------------------------------- for the config


def local_model_dir(spec: str, key: str = "model", dtype: str = "float32") -> str:
    """`spec` as a local model directory on this node (downloading it once per node; a GGUF
    file converted once per node to `dtype`)."""
    kind = kind_of(spec)
    if kind == "gguf":
        return str(gguf_model_dir(spec, key, dtype))
    if kind == "uri":
        return str(fetch_uri(spec, key))
    if kind == "hub":
        return str(_hub_snapshot(spec, key))
    return spec


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
