"""A pyarrow filesystem over a local directory that fails the way object stores and network
filesystems do, for the storage tests: `pafs.PyFileSystem(FaultyFS(root))`.

- `unreadable = "state.json"`: reading a file of that name raises an OSError that is not
  "missing" (an S3 503 after the client's retries, NFS ESTALE);
- `server_copy_max_bytes = n`: a server-side copy (`copy_file`) of a source over n bytes is
  refused, as S3's CopyObject refuses sources over 5 GiB;
- `fail_after_writes = n`: the n+1-th file written or copied raises (a connection lost in the
  middle of a long move); `None` again lets everything through.
"""

from __future__ import annotations

import pyarrow.fs as pafs


class FaultyFS(pafs.FileSystemHandler):
    def __init__(self, root) -> None:
        self.inner = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
        self.unreadable: str | None = None
        self.server_copy_max_bytes: int | None = None
        self.fail_after_writes: int | None = None
        self.server_copies: list[tuple[str, int]] = []  # (source, size) of every copy_file

    def _reading(self, path: str) -> None:
        if self.unreadable and path.rsplit("/", 1)[-1] == self.unreadable:
            raise OSError(f"AWS Error SLOW_DOWN during GetObject operation: 503 ({path})")

    def _writing(self, path: str) -> None:
        if self.fail_after_writes is not None:
            if self.fail_after_writes <= 0:
                raise OSError(f"AWS Error NETWORK_CONNECTION during PutObject operation ({path})")
            self.fail_after_writes -= 1

    def get_type_name(self):
        return "faulty"

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.inner.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.inner.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.inner.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.inner.delete_dir_contents("", accept_root_dir=True)

    def delete_file(self, path):
        self.inner.delete_file(path)

    def move(self, src, dest):
        self.inner.move(src, dest)

    def copy_file(self, src, dest):
        size = self.inner.get_file_info(src).size
        self.server_copies.append((src, size))
        if self.server_copy_max_bytes is not None and size > self.server_copy_max_bytes:
            raise OSError(
                "AWS Error INVALID_REQUEST during CopyObject operation: The specified copy source "
                f"is larger than the maximum allowable size for a copy source ({src}, {size} B)"
            )
        self._writing(dest)
        self.inner.copy_file(src, dest)

    def open_input_stream(self, path):
        self._reading(path)
        return self.inner.open_input_stream(path)

    def open_input_file(self, path):
        self._reading(path)
        return self.inner.open_input_file(path)

    def open_output_stream(self, path, metadata):
        self._writing(path)
        return self.inner.open_output_stream(path)

    def open_append_stream(self, path, metadata):
        self._writing(path)
        return self.inner.open_append_stream(path)
