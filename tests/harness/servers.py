"""Start real local servers on free loopback ports: moto S3, stac-fastapi-pgstac on PostgreSQL+PostGIS, rustac.

Every starter raises :class:`HarnessError` with a message naming what is missing instead of hanging. The classes
are plain Python so that scripts (benchmarks, the demo) can use them too, not only pytest fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SETUP_HINT = "run the README test command (scripts/setup.sh installs it)"


class HarnessError(RuntimeError):
    """A local server could not start; the message says what is missing."""


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(url: str, timeout: float, proc: subprocess.Popen | None = None, what: str = "server") -> None:
    """Poll ``url`` until it answers (any HTTP status) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace")[-2000:] if proc.stdout else ""
            raise HarnessError(f"{what} exited with code {proc.returncode} before answering {url}:\n{out}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except Exception as exc:  # connection refused while starting
            last = exc
            time.sleep(0.1)
    raise HarnessError(f"{what} did not answer {url} within {timeout:.0f} s (last error: {last})")


def _stop(proc: subprocess.Popen) -> None:
    from pipelines.embedded import stop_process

    stop_process(proc)


# --------------------------------------------------------------------------------------------------------- S3 (moto)


@dataclass
class S3Server:
    """A moto S3 server in this process, with every request recorded (method, path, Range header)."""

    endpoint_url: str
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    # per request: the access key id it was signed with ("" if unsigned) and its x-amz-request-payer header
    request_auth: list[tuple[str, str | None]] = field(default_factory=list)
    _server: Any = None
    _thread: threading.Thread | None = None

    access_key: str = "testing"
    secret_key: str = "testing"
    region: str = "us-east-1"

    @property
    def host_port(self) -> str:
        return self.endpoint_url.split("://", 1)[1]

    @property
    def env(self) -> dict[str, str]:
        """Environment for boto3/s3fs/pyarrow (``AWS_ENDPOINT_URL``) and GDAL ``/vsis3/`` (``AWS_S3_ENDPOINT``)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            # GDAL 3.10 ignores AWS_ENDPOINT_URL; these four make /vsis3/ talk to the local server.
            "AWS_S3_ENDPOINT": self.host_port,
            "AWS_HTTPS": "NO",
            "AWS_VIRTUAL_HOSTING": "FALSE",
            "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        }

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (idempotent) and return its name."""

        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
            client.create_bucket(Bucket=name)
        return name

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def filesystem(self) -> Any:
        """An ``s3fs.S3FileSystem`` talking to this server (no listing cache: tests write then read)."""
        import s3fs

        return s3fs.S3FileSystem(
            key=self.access_key,
            secret=self.secret_key,
            endpoint_url=self.endpoint_url,
            client_kwargs={"region_name": self.region},
            use_listings_cache=False,
            skip_instance_cache=True,
        )

    def pyarrow_filesystem(self) -> Any:
        from pyarrow import fs

        return fs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            endpoint_override=self.host_port,
            scheme="http",
            region=self.region,
        )

    def clear_requests(self) -> None:
        self.requests.clear()
        self.request_auth.clear()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def start_s3() -> S3Server:
    """Start moto's S3 backend behind a request-recording WSGI middleware on a free port."""
    try:
        from moto.moto_server.threaded_moto_server import MotoRequestHandler
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server
    except ImportError as exc:  # pragma: no cover - environment problem
        raise HarnessError(f"moto[server] is not installed ({exc}): {SETUP_HINT}") from exc

    port = free_port()
    server = S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    moto_app = DomainDispatcherApplication(create_backend_app)

    def app(environ: dict, start_response: Callable) -> Any:
        path = environ.get("PATH_INFO", "")
        if environ.get("QUERY_STRING"):
            path += "?" + environ["QUERY_STRING"]
        server.requests.append((environ["REQUEST_METHOD"], path, environ.get("HTTP_RANGE")))
        auth = environ.get("HTTP_AUTHORIZATION", "")
        key = auth.split("Credential=", 1)[1].split("/", 1)[0] if "Credential=" in auth else ""
        server.request_auth.append((key, environ.get("HTTP_X_AMZ_REQUEST_PAYER")))
        return moto_app(environ, start_response)

    httpd = make_server("127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="moto-s3", daemon=True)
    thread.start()
    server._server, server._thread = httpd, thread
    wait_for_http(server.endpoint_url + "/", timeout=15, what="moto S3 server")
    server.clear_requests()
    return server


# ------------------------------------------------------------------------------------ STAC API: pgstac on PostgreSQL


def find_postgres_bindir() -> Path:
    """Locate PostgreSQL's ``initdb``/``pg_ctl`` (Debian keeps them off PATH)."""
    env = os.environ.get("PG_BINDIR")
    candidates = [Path(env)] if env else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    which = shutil.which("initdb")
    if which:  # resolve symlinks: Debian links /usr/local/bin/initdb -> /usr/lib/postgresql/N/bin/initdb
        candidates.insert(0, Path(which).resolve().parent)
    for c in candidates:
        if (c / "initdb").exists() and (c / "pg_ctl").exists():
            return c
    raise HarnessError(f"PostgreSQL binaries not found (initdb, pg_ctl): {SETUP_HINT}")


def _postgis_available(bindir: Path) -> bool:
    version = bindir.parent.name
    return any(Path(p).exists() for p in (f"/usr/share/postgresql/{version}/extension/postgis.control",))


@dataclass
class PgStacServer:
    """stac-fastapi-pgstac (uvicorn subprocess) over a throw-away PostgreSQL + PostGIS cluster."""

    url: str
    dsn: str
    datadir: Path
    bindir: Path
    _procs: list[subprocess.Popen] = field(default_factory=list)
    _as_postgres: bool = False
    _postmaster: subprocess.Popen | None = None

    def _loader(self) -> Any:
        from pypgstac.db import PgstacDB
        from pypgstac.load import Loader

        return PgstacDB(dsn=self.dsn), Loader

    def load_collections(self, collections: list[dict]) -> None:
        """Upsert collections (STAC JSON dicts)."""
        from pypgstac.load import Methods

        db, loader_cls = self._loader()
        with db:
            loader_cls(db=db).load_collections(iter(collections), insert_mode=Methods.upsert)

    def load_items(self, items: list[dict]) -> None:
        """Upsert items (STAC JSON dicts); their collections must exist."""
        from pypgstac.load import Methods

        db, loader_cls = self._loader()
        with db:
            loader_cls(db=db).load_items(iter(items), insert_mode=Methods.upsert)

    def add_queryable(self, name: str, json_type: str = "number") -> None:
        """Declare a queryable so CQL2 comparisons and sorts on it are typed (e.g. ``eo:cloud_cover``)."""
        import psycopg

        wrapper = {"number": "to_float", "integer": "to_int"}.get(json_type, "to_text")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("SET search_path TO pgstac, public")
            conn.execute("DELETE FROM pgstac.queryables WHERE name = %s", (name,))
            conn.execute(
                "INSERT INTO pgstac.queryables(name, definition, property_wrapper) VALUES (%s, %s, %s)",
                (name, json.dumps({"type": json_type}), wrapper),
            )

    def execute(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql)

    def stop(self) -> None:
        for proc in reversed(self._procs):
            _stop(proc)
        cmd = [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop"]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, capture_output=True, timeout=30)
        if self._postmaster is not None:
            _stop(self._postmaster)  # reaped (already gone after the immediate stop)
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


def _owned_tempdir(prefix: str) -> Path:
    """A new temp dir named after this process (``<prefix><pid>-...``), after removing those of ``prefix`` left by
    processes that are gone: a test run killed before its teardown (SIGKILL, a CI timeout) cannot remove its own,
    and a PostgreSQL cluster is tens of MB."""
    for stale in Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):
        pid = stale.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-"))


def _wait_for_postgres(dsn: str, postmaster: subprocess.Popen, log: Path, timeout: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(dsn, connect_timeout=2).close()
            return
        except psycopg.OperationalError as exc:
            if postmaster.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise HarnessError(f"PostgreSQL did not start ({exc}):\n{tail}") from exc
            time.sleep(0.2)


def start_pgstac() -> PgStacServer:
    """initdb a temporary cluster, start PostgreSQL, ``pypgstac migrate``, then serve stac-fastapi-pgstac."""
    from pipelines.embedded import popen_child_server

    bindir = find_postgres_bindir()
    if not _postgis_available(bindir):
        raise HarnessError(f"PostGIS for PostgreSQL {bindir.parent.name} not found: {SETUP_HINT}")
    try:
        import stac_fastapi.pgstac  # noqa: F401
        from pypgstac.migrate import Migrate  # noqa: F401
    except ImportError as exc:
        raise HarnessError(f"stac-fastapi-pgstac / pypgstac not installed ({exc}): {SETUP_HINT}") from exc

    root = _owned_tempdir("pgstac-")
    datadir, sockdir = root / "data", root / "sock"
    sockdir.mkdir()
    as_postgres = os.geteuid() == 0  # initdb and postgres refuse to run as root
    prefix: list[str] = []
    if as_postgres:
        shutil.chown(root, "postgres")
        shutil.chown(sockdir, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    run = subprocess.run(
        [*prefix, str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        capture_output=True, text=True, timeout=120,
    )
    if run.returncode != 0:
        raise HarnessError(f"initdb failed: {run.stderr[-2000:]}")
    # The postmaster runs in the foreground as a child of this process, told by the kernel to stop (SIGTERM) when
    # this process dies (`popen_child_server`): a test run killed before its teardown leaves no PostgreSQL behind
    # (`pg_ctl start` daemonizes it, and a killed run left it running). It is started as the postgres user directly
    # (`user=`), not through `runuser`, so the death signal is set on the postmaster itself, after the user switch,
    # which would clear it.
    with open(root / "pg.log", "wb") as log:  # the postmaster keeps its own copy of the descriptor
        postmaster = popen_child_server(
            [str(bindir / "postgres"), "-D", str(datadir), "-p", str(port), "-k", str(sockdir),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "full_page_writes=off"],
            stdout=log, stderr=subprocess.STDOUT,
            user="postgres" if as_postgres else None, group="postgres" if as_postgres else None,
        )  # fmt: skip
    dsn = f"postgresql://postgres:postgres@127.0.0.1:{port}/postgres"
    server = PgStacServer(url="", dsn=dsn, datadir=datadir, bindir=bindir, _as_postgres=as_postgres)
    server._postmaster = postmaster
    try:
        _wait_for_postgres(dsn, postmaster, root / "pg.log", timeout=60)
        run = subprocess.run(
            [sys.executable, "-m", "pypgstac.pypgstac", "migrate", "--dsn", dsn],
            capture_output=True, text=True, timeout=120,
        )
        if run.returncode != 0:
            raise HarnessError(f"pypgstac migrate failed: {run.stderr[-2000:]}")
        api_port = free_port()
        env = dict(os.environ)
        env.update(
            PGUSER="postgres", PGPASSWORD="postgres", PGHOST="127.0.0.1", PGPORT=str(port), PGDATABASE="postgres",
            ENABLED_EXTENSIONS="query,sort,fields,filter,free_text,pagination,collection_search",
        )
        proc = popen_child_server(
            [sys.executable, "-m", "uvicorn", "stac_fastapi.pgstac.app:create_app", "--factory",
             "--host", "127.0.0.1", "--port", str(api_port), "--log-level", "warning"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        server._procs.append(proc)
        server.url = f"http://127.0.0.1:{api_port}"
        wait_for_http(server.url + "/_mgmt/ping", timeout=60, proc=proc, what="stac-fastapi-pgstac")
    except BaseException:
        server.stop()
        raise
    return server


# ---------------------------------------------------------------------------------------- STAC API: rustac in memory


@dataclass
class RustacServer:
    """``rustac serve`` (the job's own embedded STAC API) over a collection + items written to a temp dir."""

    url: str
    _stack: contextlib.ExitStack
    workdir: Path

    def stop(self) -> None:
        self._stack.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_rustac(collections: list[dict], items: list[dict]) -> RustacServer:
    """Serve ``collections`` and ``items`` with :func:`pipelines.embedded.serve_stac` on a free port."""
    from pipelines.embedded import EmbeddedServerError, serve_stac

    workdir = _owned_tempdir("rustac-")
    paths = []
    for i, collection in enumerate(collections):
        path = workdir / f"collection-{i}.json"
        path.write_text(json.dumps(collection))
        paths.append(path)
    items_path = workdir / "items.ndjson"
    items_path.write_text("".join(json.dumps(item) + "\n" for item in items))
    stack = contextlib.ExitStack()
    try:
        url = stack.enter_context(serve_stac(paths, items_path))
    except EmbeddedServerError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        raise HarnessError(f"{exc}: {SETUP_HINT}") from exc
    return RustacServer(url=url, _stack=stack, workdir=workdir)


@contextlib.contextmanager
def env_vars(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
