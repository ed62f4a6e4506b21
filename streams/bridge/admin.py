"""`/v1/models`: the registry, listed to anyone and changed by an admin (register a version,
change it, retire it), and who counts as an admin when auth is off."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import TYPE_CHECKING

from aiohttp import web
from pydantic import ValidationError

from streams.bridge.openapi import CALLER, CREDENTIAL_ERRORS, REQUEST_ERRORS, Endpoint
from streams.bridge.requests import json_object
from streams.gate.auth import ADMIN_SCOPE, ANONYMOUS, Principal
from streams.registry.records import ModelInfo
from streams.registry.store import RegistryError, info_from_artifact
from streams.settings import Settings
from topics import events
from topics.errors import ErrorCode, EventError

if TYPE_CHECKING:
    from streams.bridge.app import Bridge

CHANGEABLE = {"weight", "status", "shadow", "max_batch_delay_ms", "backends", "description"}


async def list_models(bridge: Bridge, request: web.Request) -> web.Response:
    return web.json_response([_public(i) for i in await bridge.stores.models.list()])


async def register_model(bridge: Bridge, request: web.Request) -> web.Response:
    await _admin(bridge, request)
    body = await json_object(request)
    try:
        fields = {k: v for k, v in body.items() if k not in ("name", "version", "artifact")}
        info = await asyncio.to_thread(
            info_from_artifact, str(body["name"]), str(body["version"]), str(body["artifact"]),
            bridge.client.store, bridge.settings.state_dir / "artifacts", **fields,
        )
        saved = await bridge.stores.models.save(info)
    except KeyError as exc:
        raise EventError(ErrorCode.INVALID_REQUEST, f"missing field {exc}") from None
    except ValidationError as exc:
        raise EventError(ErrorCode.INVALID_MODEL, events.problems(exc)) from None
    except (RegistryError, ValueError) as exc:
        raise EventError(ErrorCode.INVALID_MODEL, str(exc)) from None
    return web.json_response(_public(saved), status=201)


async def update_model(bridge: Bridge, request: web.Request) -> web.Response:
    await _admin(bridge, request)
    current = await _registered(bridge, request)
    changes = await json_object(request)
    if set(changes) - CHANGEABLE:
        raise EventError(ErrorCode.INVALID_REQUEST, f"can change only {sorted(CHANGEABLE)}")
    try:
        updated = ModelInfo.model_validate({**current.model_dump(), **changes})
        saved = await bridge.stores.models.save(updated)
    except ValidationError as exc:
        raise EventError(ErrorCode.INVALID_MODEL, events.problems(exc)) from None
    except (RegistryError, ValueError) as exc:
        raise EventError(ErrorCode.INVALID_MODEL, str(exc)) from None
    return web.json_response(_public(saved))


async def retire_model(bridge: Bridge, request: web.Request) -> web.Response:
    await _admin(bridge, request)
    current = await _registered(bridge, request)
    saved = await bridge.stores.models.save(current.model_copy(update={"status": "retired"}), validate=False)
    return web.json_response(_public(saved))


async def _admin(bridge: Bridge, request: web.Request) -> Principal:
    """The caller, if it may change the registry: a principal with the admin scope, or, with
    auth off, anyone who reaches a loopback-bound bridge. Raises 401/403 otherwise."""
    principal = await bridge.caller(request)
    if may_change_registry(principal, bridge.settings):
        return principal
    raise EventError(ErrorCode.FORBIDDEN, f"registry changes need the {ADMIN_SCOPE!r} scope")


async def _registered(bridge: Bridge, request: web.Request) -> ModelInfo:
    """The version the path names, as registered (whatever its status)."""
    name, version = request.match_info["model"], request.match_info["version"]
    current = await bridge.stores.models.get(name, version)
    if current is None:
        raise EventError(ErrorCode.UNKNOWN_VERSION, f"no registered version {name}/{version}")
    return current


def _public(info: ModelInfo) -> dict:
    return info.model_dump(mode="json", exclude={"path"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere


def may_change_registry(principal: Principal, settings: Settings) -> bool:
    """An admin may; with auth off, so may anyone who reaches a loopback-bound bridge."""
    return principal.is_admin or (principal is ANONYMOUS and is_loopback(settings.bridge_host))


ROUTES = [
    Endpoint("GET", "/v1/models", list_models, "Registered models and versions"),
    Endpoint("POST", "/v1/models", register_model,
             "Register a model version (validated: the artifact must load and match); needs the admin scope",
             ok=201, body="ModelRegistration", headers=CALLER,
             errors=(*REQUEST_ERRORS, *CREDENTIAL_ERRORS, ErrorCode.INVALID_MODEL)),
    Endpoint("PATCH", "/v1/models/{model}/versions/{version}", update_model,
             "Change weight, status, shadow, batching or backends; needs the admin scope", body="ModelChange",
             headers=CALLER, errors=(*REQUEST_ERRORS, *CREDENTIAL_ERRORS, ErrorCode.UNKNOWN_VERSION,
                                     ErrorCode.INVALID_MODEL)),
    Endpoint("DELETE", "/v1/models/{model}/versions/{version}", retire_model,
             "Retire a version; needs the admin scope", headers=CALLER,
             errors=(*CREDENTIAL_ERRORS, ErrorCode.UNKNOWN_VERSION)),
]
