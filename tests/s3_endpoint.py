"""A real S3 endpoint for the tests: moto's server on a loopback port, spoken to over HTTP by
pyarrow's S3 client exactly as a cluster speaks to S3 (no mock of our own filesystem layer).

    with S3Endpoint() as s3:                     # or the `s3` fixture (tests/conftest.py)
        uri = s3.uri("run")                      # s3://eopd-test/run?endpoint_override=...&scheme=http
        s3.upload_dir(local_model, "models/student")
        with s3.outage(after_uploads=3):         # from the 4th object on: HTTP 503
            ...

Credentials are moto's dummy ones, given the standard way (AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from eopd_ray.ports import free_port

BUCKET = "eopd-test"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _completes_an_object(environ) -> bool:
    """A single PUT of an object (not a directory marker, not one part of a multipart upload),
    or the POST that completes a multipart upload."""
    method, path, query = environ["REQUEST_METHOD"], environ["PATH_INFO"], environ["QUERY_STRING"]
    if method == "PUT":
        return not path.endswith("/") and "partNumber" not in query
    return method == "POST" and "uploadId=" in query


class _Outage:
    """WSGI middleware: once `after_uploads` objects were stored, every request gets 503."""

    def __init__(self, app) -> None:
        self.app = app
        self.after_uploads: int | None = None
        self.uploads = 0

    @property
    def down(self) -> bool:
        return self.after_uploads is not None and self.uploads >= self.after_uploads

    def __call__(self, environ, start_response):
        if self.down:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"endpoint stopped by the test"]
        if _completes_an_object(environ):
            self.uploads += 1
        return self.app(environ, start_response)


class S3Endpoint:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._saved_env: dict[str, str | None] = {}

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> S3Endpoint:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        for key, value in CREDENTIALS.items():
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = value
        self.server.start()
        self._outage = _Outage(self.server._server.app)
        self.server._server.app = self._outage
        self.fs.create_dir(BUCKET)
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    @property
    def fs(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(
            access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region=CREDENTIALS["AWS_DEFAULT_REGION"],
            endpoint_override=self.endpoint,
            scheme="http",
            allow_bucket_creation=True,
        )

    def uri(self, key: str) -> str:
        """`key` in the test bucket as a URI pyarrow opens with this endpoint."""
        return f"s3://{BUCKET}/{key}?endpoint_override={self.endpoint}&scheme=http"

    def path(self, key: str) -> str:
        return f"{BUCKET}/{key}"

    def upload_dir(self, local: Path, key: str) -> str:
        self.fs.create_dir(self.path(key))
        pafs.copy_files(
            str(local),
            self.path(key),
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=self.fs,
        )
        return self.uri(key)

    def put_bytes(self, key: str, data: bytes) -> str:
        with self.fs.open_output_stream(self.path(key)) as fh:
            fh.write(data)
        return self.uri(key)

    def keys(self, prefix: str) -> list[str]:
        found = self.fs.get_file_info(pafs.FileSelector(self.path(prefix), recursive=True))
        return sorted(
            f.path[len(self.path(prefix)) + 1 :] for f in found if f.type == pafs.FileType.File
        )

    @contextmanager
    def outage(self, after_uploads: int = 0):
        """The endpoint answers 503 to everything once `after_uploads` more objects were stored;
        back to normal on exit."""
        self._outage.uploads, self._outage.after_uploads = 0, after_uploads
        try:
            yield self._outage
        finally:
            self._outage.after_uploads = None
