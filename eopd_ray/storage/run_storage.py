"""Where a run's outputs live: a local directory or any `pyarrow.fs` URI.

    store = RunStorage("s3://bucket/runs/my-run")      # or "/mnt/runs/my-run", "gs://...", ...
    store.write_text("config.yaml", text)              # atomic: complete or absent
    local = store.staging("checkpoints/step-000012/learner/rank-0")  # a writer's local directory
    ...  # write files there (DeepSpeed, safetensors, TensorBoard)
    store.publish(local, "checkpoints/step-000012/learner")

As Ray Train's `storage_path`, `run.output_dir` is a path on one filesystem every process of
the run can reach: a local directory shared by every node (NFS, a Kubernetes volume) or an
object store (S3, GCS, HDFS, Azure through pyarrow). Writers that need a POSIX directory
(DeepSpeed, safetensors, TensorBoard) write into `staging(...)`: the real directory when the
storage is local, else a node-local scratch directory whose files `publish` uploads. Every
process opens the filesystem itself (a `RunStorage` pickles as its location), so checkpoints
from every learner rank reach the storage without a shared mount.

Imports neither Ray, vLLM nor DeepSpeed.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs

from eopd_ray.errors import EopdError

# S3's CopyObject takes sources up to 5 GiB; larger files are streamed (multipart upload).
SERVER_COPY_MAX_BYTES = 5 * 2**30
STREAM_CHUNK_BYTES = 64 * 2**20


class StorageError(EopdError, OSError):
    """The run's storage location cannot be opened or written; names it and how to fix it.
    Also an OSError, so code that handles a failed read or write still sees one."""


def is_uri(location: str) -> bool:
    """`s3://...`, `gs://...`, `file:///...`, `mock://...`: a scheme before `://`."""
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme.replace("+", "").replace("-", "").isalnum()


# Query parameters of a pyarrow URI that carry secrets: never shown in a message or a log.
SECRET_PARAMETERS = ("access_key", "secret_key", "session_token", "credential")


def endpoint_hint(uri: str) -> str:
    """For an S3 URI that names no endpoint (none in its query, no AWS_ENDPOINT_URL): how to
    give one, since a forgotten endpoint of MinIO, Ceph or a test server reaches AWS instead."""
    if not uri.startswith("s3://") or "endpoint_override=" in uri:
        return ""
    if os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3"):
        return ""
    return (
        "; no S3 endpoint is given, so AWS itself was asked: for MinIO, Ceph or another "
        "S3-compatible store put it in the URI (`?endpoint_override=host:port&scheme=http`) or "
        "set AWS_ENDPOINT_URL"
    )


def redacted_values(tree):
    """`tree` (dicts, lists, strings: a config as a dict) with every URI `redacted`."""
    if isinstance(tree, dict):
        return {key: redacted_values(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return [redacted_values(value) for value in tree]
    return redacted(tree) if isinstance(tree, str) else tree


def redacted(uri: str) -> str:
    """`uri` with its user info (`s3://KEY:SECRET@bucket/...`, the form pyarrow accepts) and the
    values of secret query parameters replaced by `***`; anything else as given."""
    if not is_uri(uri):
        return uri
    scheme, _, rest = uri.partition("://")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        uri = f"{scheme}://***@{netloc.rpartition('@')[2]}{slash}{path}"
    uri, hash_, fragment = uri.partition("#")  # a pin (`#sha256=`, `#listing=`) is no secret
    base, sep, query = uri.partition("?")
    if not sep:
        return f"{uri}{hash_}{fragment}"
    parts = []
    for part in query.split("&"):
        name, eq, _ = part.partition("=")
        secret = eq and any(s in name.lower() for s in SECRET_PARAMETERS)
        parts.append(f"{name}=***" if secret else part)
    return f"{base}?{'&'.join(parts)}{hash_}{fragment}"


class RunStorage:
    """One run directory on a `pyarrow.fs` filesystem; paths below it are relative, `/`-joined."""

    def __init__(
        self, location: str, filesystem: pafs.FileSystem | None = None, key: str = "run.output_dir"
    ) -> None:
        """`location`: an absolute local path or a URI. `filesystem` (tests): use this instance
        (e.g. an in-memory one) with `location` as the path on it. `key`: the setting or option
        that gave `location`, for messages."""
        self.location, self.key = location, key
        self._given = filesystem
        self._fs: pafs.FileSystem | None = filesystem
        self._root: str | None = location.rstrip("/") if filesystem is not None else None

    # A RunStorage crosses Ray actor boundaries: each process opens the filesystem itself.
    def __getstate__(self) -> dict:
        return {"location": self.location, "filesystem": self._given, "key": self.key}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["location"], state["filesystem"], state.get("key", "run.output_dir"))

    def __repr__(self) -> str:
        return f"RunStorage({self.uri!r})"

    def _open(self) -> None:
        if self._fs is not None:
            return
        if not is_uri(self.location) and not os.path.isabs(self.location):
            raise StorageError(
                f"{self.key} = {self.location!r} is a relative path; resolve it first "
                "(eopd_ray.driver.locations.resolve_locations)"
            )
        try:
            self._fs, root = pafs.FileSystem.from_uri(self.location)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise StorageError(
                f"{self.key} = {redacted(self.location)!r}: cannot open it as a filesystem "
                f"({exc}); use an absolute path or a URI pyarrow understands (s3://, gs://, "
                f"hdfs://, file://) and check the credentials{endpoint_hint(self.location)}"
            ) from None
        self._root = root.rstrip("/") or "/"

    def check(self) -> None:
        """Open the storage and list its root (one request): a wrong endpoint, bucket or
        credentials fail now, naming the setting, not after Ray and the workers started."""
        try:
            self.fs.get_file_info(self.path())
        except StorageError:
            raise
        except OSError as exc:
            raise StorageError(
                f"{self.key} = {self.show()!r}: cannot reach it ({exc}); check the URI, the "
                f"bucket and the credentials{endpoint_hint(self.location)}"
            ) from None

    @property
    def fs(self) -> pafs.FileSystem:
        self._open()
        return self._fs  # type: ignore[return-value]

    @property
    def root(self) -> str:
        self._open()
        return self._root  # type: ignore[return-value]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def uri(self) -> str:
        """What to show a user: the absolute path for local storage, else the URI."""
        return self.show()

    def show(self, rel: str = "") -> str:
        """Where `rel` is, as a user would type it: an absolute local path, or the URI with `rel`
        joined to its path and its query (`?endpoint_override=...&scheme=http`) kept last."""
        if self._given is None and self.is_local:
            return self.path(rel)
        base, sep, query = redacted(self.location).partition("?")
        joined = f"{base.rstrip('/')}/{rel}" if rel else base
        return f"{joined}{sep}{query}"

    def path(self, rel: str = "") -> str:
        """The full path of `rel` on the filesystem."""
        return posixpath.join(self.root, rel) if rel else self.root

    def local_path(self, rel: str = "") -> Path:
        """`rel` as a local path; only for local storage."""
        if not self.is_local:
            raise StorageError(f"{self.uri} is not a local directory")
        return Path(self.path(rel))

    # --- reading ---------------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_dir(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.Directory

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under `rel` (files and directories), sorted; [] when it is missing."""
        if not self.is_dir(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(info.base_name for info in infos)

    def file_sizes(self, rel: str = "") -> dict[str, int]:
        """Every file below `rel` (recursively) and its size in bytes, by `/`-joined path
        relative to `rel` (one listing, not a request per file); {} when it is missing."""
        root = self.path(rel).rstrip("/") + "/"
        selector = pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True)
        return {
            info.path[len(root) :]: info.size
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File
        }

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as fh:
            return fh.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    # --- writing ---------------------------------------------------------------------------------

    def makedirs(self, rel: str = "") -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Complete or absent: locally a synced temporary file renamed over `rel`; on an object
        store one PUT (which is atomic)."""
        parent = posixpath.dirname(rel)
        self.makedirs(parent)
        if not self.is_local:
            try:
                with self.fs.open_output_stream(self.path(rel)) as fh:
                    fh.write(data)
            except OSError as exc:
                raise StorageError(f"writing {self.show(rel)} failed ({exc})") from None
            return
        target = self.local_path(rel)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def delete(self, rel: str) -> None:
        """A file or a whole directory; nothing when missing."""
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type != pafs.FileType.NotFound:
            self.fs.delete_file(self.path(rel))

    def move(self, src: str, dst: str) -> None:
        """A rename locally. On object stores (no rename) file by file: copy, check the size,
        delete the source; an interrupted move is finished by calling it again with the same
        `dst` (what is left of `src` is what was not moved yet). Files over
        `SERVER_COPY_MAX_BYTES` (S3's CopyObject refuses sources over 5 GiB; a ZeRO optimizer
        shard of a 1.7B model is ~10 GB) are streamed through this process instead."""
        self.makedirs(posixpath.dirname(dst))
        if self.is_local:
            os.rename(self.path(src), self.path(dst))
            return
        if not self.is_dir(src):
            self._move_file(src, dst)
            return
        selector = pafs.FileSelector(self.path(src), recursive=True, allow_not_found=True)
        prefix = self.path(src).rstrip("/") + "/"
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File:
                below = info.path[len(prefix) :]
                self._move_file(f"{src}/{below}", f"{dst}/{below}")
        self.delete(src)

    def _move_file(self, src: str, dst: str) -> None:
        size = self.fs.get_file_info(self.path(src)).size
        self.makedirs(posixpath.dirname(dst))
        if size <= SERVER_COPY_MAX_BYTES:
            self.fs.copy_file(self.path(src), self.path(dst))  # server-side, no bytes through us
        else:
            with (
                self.fs.open_input_stream(self.path(src)) as reader,
                self.fs.open_output_stream(self.path(dst)) as writer,
            ):
                while chunk := reader.read(STREAM_CHUNK_BYTES):
                    writer.write(chunk)
        copied = self.fs.get_file_info(self.path(dst)).size
        if copied != size:
            raise StorageError(
                f"moving {self.show(src)} to {self.show(dst)}: {copied} of {size} bytes arrived; "
                "the source is kept. Run again to finish the move"
            )
        self.fs.delete_file(self.path(src))

    # --- local writers --------------------------------------------------------------------------

    def _scratch(self) -> Path:
        """This node's scratch directory for this storage location."""
        key = hashlib.sha256(self.location.encode()).hexdigest()[:12]
        base = Path(tempfile.gettempdir()) / "eopd-staging" / key
        base.mkdir(parents=True, exist_ok=True)
        return base

    def staging(self, rel: str) -> Path:
        """A local directory in which to write what belongs at `rel`: `rel` itself for local
        storage, else an empty node-local scratch directory (then `publish` it)."""
        if self.is_local:
            path = self.local_path(rel)
            path.mkdir(parents=True, exist_ok=True)
            return path
        return Path(tempfile.mkdtemp(dir=self._scratch(), prefix=rel.replace("/", "_")[-60:] + "."))

    def publish(self, local: Path, rel: str) -> None:
        """Upload the files written into `staging(rel)` (recursively) to `rel` and drop the
        scratch copy. Nothing to do for local storage."""
        local = Path(local)
        if self.is_local and local.resolve() == self.local_path(rel).resolve():
            return
        try:
            self.makedirs(rel)
            pafs.copy_files(
                str(local),
                self.path(rel),
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.fs,
            )
            # pyarrow 26's copy_files only logs ("Error ignored when destroying file") an upload
            # that fails when its stream closes: check that every file arrived, whole.
            missing = self._not_uploaded(local, rel)
        except OSError as exc:
            raise StorageError(
                f"uploading {local} to {self.show(rel)} failed ({exc}); the storage refused or "
                "stopped answering after the client's retries: nothing there is marked complete"
            ) from None
        if missing:
            raise StorageError(
                f"uploading {local} to {self.show(rel)}: {len(missing)} file(s) did not arrive "
                f"whole ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); the "
                "storage stopped answering? nothing there is marked complete"
            )
        shutil.rmtree(local, ignore_errors=True)

    def _not_uploaded(self, local: Path, rel: str) -> list[str]:
        """Files under `local` that `rel` lacks or holds with another size."""
        sizes = self.file_sizes(rel)
        return sorted(
            p.relative_to(local).as_posix()
            for p in local.rglob("*")
            if p.is_file() and sizes.get(p.relative_to(local).as_posix()) != p.stat().st_size
        )

    def upload_file(self, local: Path, rel: str) -> None:
        """One local file to `rel` (e.g. metrics.jsonl kept locally and appended to)."""
        self.write_bytes(rel, Path(local).read_bytes())

    def fetch(self, rel: str, keep: Callable[[str], bool] | None = None) -> Path:
        """`rel` (a directory) as a local directory to read from: itself for local storage, else a
        downloaded copy in node-local scratch space of the files below it for which `keep`
        (their `/`-joined path relative to `rel`) is true, all of them without `keep` (a
        learner rank needs its own optimizer shard, not every rank's: learner_files.files_of_rank).
        Each file is checked to have arrived whole."""
        if self.is_local:
            return self.local_path(rel)
        local = Path(tempfile.mkdtemp(dir=self._scratch(), prefix="fetch-"))
        try:
            sizes = self.file_sizes(rel)
            if not sizes:
                raise FileNotFoundError(f"no files below {self.show(rel)}")
            for name, size in sizes.items():
                if keep is None or keep(name):
                    self._download(f"{rel}/{name}" if rel else name, local / name, size)
        except OSError as exc:
            shutil.rmtree(local, ignore_errors=True)
            raise StorageError(f"downloading {self.show(rel)} failed ({exc})") from None
        return local

    def _download(self, rel: str, target: Path, size: int) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open_input_stream(self.path(rel)) as reader, open(target, "wb") as writer:
            while chunk := reader.read(STREAM_CHUNK_BYTES):
                writer.write(chunk)
        if target.stat().st_size != size:
            raise OSError(f"{target.stat().st_size} of the {size} bytes of {rel} arrived")


class BackgroundUpload:
    """`store.publish(local, rel)` in a thread of its own: a checkpoint uploaded while the next
    step trains. `join()` waits and raises the upload's error (a StorageError naming the URI)."""

    def __init__(self, store: RunStorage, local: Path, rel: str) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(store, local, rel), daemon=True, name=f"upload {rel}"
        )
        self._thread.start()

    def _run(self, store: RunStorage, local: Path, rel: str) -> None:
        try:
            store.publish(local, rel)
        except BaseException as exc:  # reported by join() / upload_state()
            self.error = exc

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error
