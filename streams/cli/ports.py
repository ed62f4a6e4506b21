"""The ports a command is about to bind, checked before anything starts: a taken one is named with
the setting that moves it, not found later in a server's traceback."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from streams.cli.common import fail

if TYPE_CHECKING:
    from streams.settings import Settings


@dataclass(frozen=True)
class Port:
    """A port a command is about to bind: what binds it and the setting that moves it."""

    port: int
    what: str
    setting: str
    host: str = "127.0.0.1"


def port_taken(port: int, host: str = "127.0.0.1") -> bool:
    """True when something listens on (or holds) host:port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        # Like the servers themselves, ignore TIME_WAIT leftovers of an earlier run.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def port_problem(ports: list[Port]) -> str | None:
    """What stops `ports` from being bound, naming the port and its setting: one of them is taken,
    or two of them are the same. None when they are all free."""
    seen: dict[int, Port] = {}
    for needed in ports:
        other = seen.setdefault(needed.port, needed)
        if other is not needed:
            return (f"port {needed.port} is set for both {other.what} ({other.setting}) and "
                    f"{needed.what} ({needed.setting}); set one of them to another port")
    for needed in ports:
        if port_taken(needed.port, needed.host):
            return (f"port {needed.port} ({needed.what}) is taken by another process; set "
                    f"{needed.setting} to another port, or stop that process")
    return None


def refuse_taken(ports: list[Port]) -> None:
    """Refuse the command when one of `ports` cannot be bound."""
    if problem := port_problem(ports):
        fail(problem)


def service_ports(settings: Settings, services: tuple[str, ...], workers: int = 1) -> list[Port]:
    """The ports the bridge and the worker processes bind (worker i serves its metrics on the
    metrics port + i)."""
    ports = []
    if "bridge" in services:
        ports.append(Port(settings.bridge_port, "HTTP bridge", "INFERSTREAM_BRIDGE_PORT", settings.bridge_host))
    if "worker" in services and settings.metrics_port > 0:
        ports += [Port(settings.metrics_port + i, "worker metrics", "INFERSTREAM_METRICS_PORT", settings.metrics_host)
                  for i in range(workers)]
    return ports
