"""Who may change the registry through the bridge, and where a bridge without auth may listen."""

import pytest

from streams.bridge.admin import is_loopback, may_change_registry
from streams.bridge.app import check_exposure
from streams.gate.auth import ANONYMOUS, Principal
from streams.settings import Settings


def settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("bridge.example", False),
])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


def test_without_auth_the_bridge_listens_only_on_loopback_unless_told():
    check_exposure(settings(auth_required=False, bridge_host="127.0.0.1"))
    with pytest.raises(ValueError, match="INFERSTREAM_BRIDGE_OPEN_WITHOUT_AUTH"):
        check_exposure(settings(auth_required=False, bridge_host="0.0.0.0"))
    check_exposure(settings(auth_required=False, bridge_host="0.0.0.0", bridge_open_without_auth=True))
    check_exposure(settings(auth_required=True, bridge_host="0.0.0.0"))


def test_registry_changes_need_the_admin_scope_or_an_anonymous_caller_on_loopback():
    admin = Principal("acme", "root", frozenset({"admin"}), "jwt")
    caller = Principal("acme", "alice", frozenset({"infer"}), "jwt")
    local, exposed = settings(bridge_host="127.0.0.1"), settings(bridge_host="0.0.0.0", bridge_open_without_auth=True)
    assert may_change_registry(admin, local) and may_change_registry(admin, exposed)
    assert not may_change_registry(caller, local) and not may_change_registry(caller, exposed)
    assert may_change_registry(ANONYMOUS, local) and not may_change_registry(ANONYMOUS, exposed)


@pytest.mark.parametrize(("url", "allowed"), [
    ("127.0.0.1:8001", True), ("localhost:8000", True),
    ("127.0.0.1", False), ("10.0.0.7:8001", False), ("127.0.0.1:8001/v2", False), ("127.0.0.1:8001?x", False),
    ("user@127.0.0.1:8001", False), ("127.0.0.1:99999", False), ("", False), (None, False),
    ("127.0.0.1.example:80", False),
])
def test_triton_backends_only_on_allowed_hosts(url, allowed):
    from streams.serving.backends.triton import triton_host_allowed

    assert triton_host_allowed(url, ["127.0.0.1", "localhost"]) is allowed
