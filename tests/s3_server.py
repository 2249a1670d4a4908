"""A real S3 API on localhost for the tests: moto's server, in-process, on a free port, with fault injection.

Use it through the `s3` pytest fixture (import it into a test module: `from s3_server import s3  # noqa: F401`,
or list it in a conftest). The fixture yields an `S3Server`:

- `.endpoint`          "http://127.0.0.1:<port>"; also exported as env `AWS_ENDPOINT_URL`, which botocore, boto3,
                       aiobotocore and so s3fs/fsspec all read: code under test needs no endpoint argument.
- `.client`            a boto3 S3 client for that endpoint (put_object, get_object, list_objects_v2, ...).
- `.bucket(name)`      creates the bucket (idempotent) and returns its name.
- `.put(bucket, key, data)` / `.upload_folder(folder, bucket, prefix)`: write objects (bytes / a whole local tree),
                       returning the `s3://bucket/key` URL.
- `.fail_next(n, path_substring, status=500, method=None)`: the next `n` requests whose URL path contains the
                       substring (and whose HTTP method is `method`, when given: `"GET"` fails the body downloads
                       while HEAD / listings still work, a failure in the middle of a fetch) get that HTTP status
                       with an S3 XML error body (`n=None`: every such request until `clear_failures()`).
                       Requests to other paths are served normally.
- `.corrupt_next(n, path_substring, method="GET")`: the next `n` matching requests are served by moto but with
                       the first byte of the body flipped (same length, same headers: a checksum must catch it).
- `.requests`          the list of (method, path) the server received (for "the second run made no request").
- `.stop()`            shuts the server down (the network is then unreachable: connection refused) and clears
                       s3fs's instance cache (so no cached listing answers for it). Idempotent.

Credentials are fake (`AWS_ACCESS_KEY_ID=testing` ...), region us-east-1, and `AWS_CONFIG_FILE` /
`AWS_SHARED_CREDENTIALS_FILE` point at a missing file so a developer's own profile is never read. Moto's state is
reset when each fixture starts, and s3fs's instance cache is cleared before and after (a cached filesystem
object would otherwise keep the previous test's endpoint).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
    "<Message>injected by tests/s3_server.py</Message></Error>"
)


class _FaultInjector:
    """WSGI middleware: answers matching requests with an error instead of passing them to moto."""

    def __init__(self, app):
        self.app = app
        # [substring, remaining (None = forever), status (None = corrupt the body), method (None = any)]
        self.rules: list[list] = []
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def _take(self, method: str, path: str) -> tuple[bool, int | None]:
        """(whether a rule matched, its status: None = corrupt the body)."""
        with self.lock:
            self.requests.append((method, path))
            for rule in self.rules:
                substring, remaining, status, only = rule
                if substring in path and only in (None, method) and (remaining is None or remaining > 0):
                    if remaining is not None:
                        rule[1] = remaining - 1
                    return True, status
        return False, None

    def __call__(self, environ, start_response):
        matched, status = self._take(environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", ""))
        if not matched:
            return self.app(environ, start_response)
        if status is None:
            body = b"".join(self.app(environ, start_response))
            return [bytes([body[0] ^ 0xFF]) + body[1:]] if body else [body]
        body = _ERROR_BODY.encode()
        start_response(f"{status} Injected", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        return [body]


class S3Server:
    """moto's S3 on 127.0.0.1 in a daemon thread; see the module docstring for the interface."""

    def __init__(self):
        from moto.server import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server

        self._faults = _FaultInjector(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", 0, self._faults, threaded=True)
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self._stopped = False
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import boto3

            self._client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        return self._client

    @property
    def requests(self) -> list[tuple[str, str]]:
        with self._faults.lock:
            return list(self._faults.requests)

    def reset_state(self) -> None:
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST")).read()
        with self._faults.lock:
            self._faults.requests.clear()

    def bucket(self, name: str) -> str:
        try:
            self.client.create_bucket(Bucket=name)
        except self.client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def put(self, bucket: str, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=bucket, Key=key, Body=data)
        return f"s3://{bucket}/{key}"

    def upload_folder(self, folder: Path, bucket: str, prefix: str) -> str:
        """Every file under `folder` to `s3://bucket/prefix/<relative path>`; returns `s3://bucket/prefix`."""
        prefix = prefix.strip("/")
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                self.put(bucket, f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())
        return f"s3://{bucket}/{prefix}"

    def fail_next(self, n: int | None, path_substring: str, status: int = 500, method: str | None = None) -> None:
        with self._faults.lock:
            self._faults.rules.append([path_substring, n, status, method])

    def corrupt_next(self, n: int | None, path_substring: str, method: str | None = "GET") -> None:
        with self._faults.lock:
            self._faults.rules.append([path_substring, n, None, method])

    def clear_failures(self) -> None:
        with self._faults.lock:
            self._faults.rules.clear()

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            _clear_s3fs_instances()


def _clear_s3fs_instances() -> None:
    try:
        from s3fs import S3FileSystem
    except ImportError:
        return
    S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """A fresh moto S3 server for one test, with the AWS environment pointing at it (module docstring)."""
    missing = str(tmp_path / "no-aws-config")
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", missing)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", missing)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    server = S3Server()
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
    _clear_s3fs_instances()
    server.reset_state()
    try:
        yield server
    finally:
        server.stop()
        _clear_s3fs_instances()
