"""The worker's /healthz: 200 while its event loop turns, 503 before the first turn and once the
loop is stuck, without I/O (a fake clock, and the WSGI app called directly); and where the
metrics server listens."""

import urllib.request

from infra.local.stack import free_port
from streams.settings import Settings
from streams.telemetry.metrics import LoopLiveness, metrics_app, serve


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_alive_only_while_the_loop_beats_within_the_limit():
    clock = Clock()
    liveness = LoopLiveness(stale_after_s=20, clock=clock)
    assert liveness.check() == (False, "event loop not started")
    liveness.beat()
    clock.now += 20
    assert liveness.check()[0]
    clock.now += 0.1
    alive, why = liveness.check()
    assert not alive and "stuck" in why and "20.1 s" in why
    liveness.beat()  # the loop came back
    assert liveness.check()[0]


def _get(app, path: str) -> tuple[str, bytes]:
    answered: list[str] = []
    body = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": ""},
                        lambda status, headers: answered.append(status)))
    return answered[0], body


def test_healthz_answers_from_the_loop_and_other_paths_serve_the_metrics():
    clock = Clock()
    liveness = LoopLiveness(stale_after_s=5, clock=clock)
    app = metrics_app(liveness)
    assert _get(app, "/healthz")[0].startswith("503")
    liveness.beat()
    status, body = _get(app, "/healthz")
    assert status == "200 OK" and body.startswith(b"event loop turned")
    clock.now += 6  # the metrics thread still answers, but the loop has not turned
    assert _get(app, "/healthz")[0] == "503 Service Unavailable"
    status, body = _get(app, "/metrics")
    assert status == "200 OK" and b"inferstream_requests_total" in body


def test_metrics_listen_on_loopback_unless_told_otherwise():
    """/metrics and /healthz are for a local scraper unless INFERSTREAM_METRICS_HOST opens them
    (the images do, for Prometheus and the kubelet)."""
    settings = Settings(metrics_port=free_port())
    server = serve(settings.metrics_host, settings.metrics_port, LoopLiveness())
    try:
        assert server.server_address == ("127.0.0.1", settings.metrics_port)
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/metrics", timeout=10) as answer:
            assert answer.status == 200
    finally:
        server.shutdown()
        server.server_close()
