"""A real tritonserver as a process, for tests and benchmarks that compare against Triton.

It runs `infra/triton/serve.py` under `.venv-triton`'s python (PyTriton bundles tritonserver and
pins numpy<2, hence a venv of its own; `infra/triton/setup.sh` creates it), serving models of an
inferstream model repository on free loopback ports:

    server = TritonServer(repository, ["tiny"], tmp_path / "triton.log").start()
    try:
        server.wait_ready()
        client = tritonclient.http.InferenceServerClient(server.http_url)
        ...
    finally:
        server.stop()
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from infra.local import ROOT
from infra.local.stack import free_port

TRITON_VENV = ROOT / ".venv-triton"
SERVE_SCRIPT = ROOT / "infra" / "triton" / "serve.py"
SETUP_HINT = "run infra/triton/setup.sh"
STOP_TIMEOUT_S = 30.0  # serve.py exits 5-10 s after SIGTERM (tritonserver drains, then unloads)
KILL_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 2.0
POLL_INTERVAL_S = 0.5


def triton_python() -> Path:
    return TRITON_VENV / "bin" / "python"


def triton_available() -> bool:
    """True when .venv-triton exists (infra/triton/setup.sh has run)."""
    return triton_python().is_file()


class TritonServer:
    """serve.py (PyTriton + tritonserver) for `models` of `repository`, stopped by its PID.

    Ports left at 0 are free ones picked at start; given ports let a replacement server take
    over a stopped one's addresses.
    """

    def __init__(self, repository: Path, models: list[str], log_path: Path, *, http_port: int = 0,
                 grpc_port: int = 0, metrics_port: int = 0) -> None:
        self.repository = Path(repository)
        self.models = list(models)
        self.log_path = log_path
        self.requested_ports = (http_port, grpc_port, metrics_port)
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> TritonServer:
        if not triton_available():
            raise RuntimeError(f"{TRITON_VENV} is missing: {SETUP_HINT}")
        ports = (port or free_port() for port in self.requested_ports)
        self.http_port, self.grpc_port, self.metrics_port = ports
        argv = [str(triton_python()), str(SERVE_SCRIPT), "--repository", str(self.repository),
                "--model", *self.models, "--http-port", str(self.http_port),
                "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port)]
        with open(self.log_path, "ab") as log:
            # Its own session: a Ctrl-C meant for the caller does not reach it, and the SIGKILL
            # fallback in stop() can take its whole process group (tritonserver, backend stubs).
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                         start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the server and every model answer ready (model loading takes ~5-15 s)."""
        deadline = time.monotonic() + timeout
        client = triton_http.InferenceServerClient(self.http_url, connection_timeout=PROBE_TIMEOUT_S,
                                                   network_timeout=PROBE_TIMEOUT_S)
        try:
            while time.monotonic() < deadline:
                self.check_running()
                if self._ready(client):
                    return
                time.sleep(POLL_INTERVAL_S)
        finally:
            client.close()
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s:\n{self.log()[-3000:]}")

    def _ready(self, client: triton_http.InferenceServerClient) -> bool:
        try:
            return client.is_server_ready() and all(client.is_model_ready(m) for m in self.models)
        except (InferenceServerException, OSError):  # not listening yet
            return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL to its process group if it has not exited in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # start_new_session: its group id is its PID
            self.proc.wait(KILL_TIMEOUT_S)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def check_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = self.proc.returncode if self.proc else None
            raise RuntimeError(f"tritonserver (serve.py) exited with {code}:\n{self.log()[-3000:]}")
