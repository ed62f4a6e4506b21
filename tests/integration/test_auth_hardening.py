"""The auth stage against hostile credentials, end to end through a real worker: tokens without
`exp`, tenant claims PostgreSQL cannot store, and API-key failures that must all look alike."""

from __future__ import annotations

import pytest
from support.gate import AUTH, Stores, call, ready_with, token

from streams.client import InferenceClient
from streams.gate.auth import new_api_key, parse_api_key
from topics.events import Credentials

pytestmark = pytest.mark.integration
NUL_TENANT = "acme\u0000evil"


def bearer(jwt_token: str) -> Credentials:
    return Credentials(authorization=f"Bearer {jwt_token}")


async def test_a_token_without_exp_is_refused(start_worker, settings):
    worker = start_worker(**AUTH)
    async with InferenceClient(settings) as client:
        await ready_with(client, worker, bearer(token()))
        result = await call(client, bearer(token(exp=None)))
    error = result.header.error
    assert error is not None and error.code == "UNAUTHENTICATED", result.header
    assert "'exp'" in error.message


async def test_a_nul_byte_in_the_tenant_claim_is_refused_and_the_worker_serves_on(start_worker, settings):
    worker = start_worker(**AUTH)
    async with InferenceClient(settings) as client:
        await ready_with(client, worker, bearer(token()))
        hostile = await call(client, bearer(token(tenant=NUL_TENANT)))
        after = await call(client, bearer(token()), seed=1)
    worker.check_running()
    error = hostile.header.error
    assert error is not None and error.code == "UNAUTHENTICATED", hostile.header
    assert "'tenant'" in error.message and "\u0000" not in error.message
    assert after.header.status == "ok" and after.header.tenant == "acme", after.header


async def test_every_api_key_failure_answers_alike(start_worker, settings):
    worker = start_worker(**AUTH)
    async with Stores(worker.settings) as stores, InferenceClient(settings) as client:
        good = await stores.keys.create("acme", ["infer"], name="ci")
        revoked = await stores.keys.create("acme", ["infer"], name="old")
        await ready_with(client, worker, Credentials(api_key=good))
        await stores.keys.revoke(parse_api_key(revoked)[0])
        key_id, _ = parse_api_key(good)
        failures = {
            "unknown key id": new_api_key()[2],
            "revoked key": revoked,
            "wrong secret": f"isk_{key_id}_{new_api_key()[1]}",
            "malformed key": "isk_nope",
        }
        results = {name: await call(client, Credentials(api_key=key)) for name, key in failures.items()}
    answers = {name: (r.header.error.code, r.header.error.message) if r.header.error else r.header.status
               for name, r in results.items()}
    assert set(answers.values()) == {("UNAUTHENTICATED", "invalid API key")}, answers
