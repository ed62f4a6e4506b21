import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from streams.gate.auth import (
    ANONYMOUS,
    INVALID_API_KEY,
    MAX_SCOPES,
    ApiKeyStore,
    Authenticator,
    JwtVerifier,
    Principal,
    check_tenant_and_scopes,
    hash_secret,
    new_api_key,
    parse_api_key,
    principal_claims,
    principal_from_claims,
    secret_matches,
)
from topics.errors import ErrorCode, EventError
from topics.events import Credentials

SECRET = "s" * 64  # long enough for HS512 too
ISSUER = "https://issuer.example"
AUDIENCE = "inferstream"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def public_pem(rsa_key) -> str:
    return rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


@pytest.fixture
def verifier(public_pem) -> JwtVerifier:
    return JwtVerifier(["HS256", "RS256"], hs_secret=SECRET, rs_public_key=public_pem,
                       issuer=ISSUER, audience=AUDIENCE)


@dataclass(frozen=True)
class FromNow:
    """A time claim relative to the moment the token is built, not to when the test was collected
    (parameters are built at import, possibly many minutes before the test runs)."""

    seconds: int


def claims(**overrides) -> dict:
    now = int(time.time())
    base = {"sub": "alice", "tenant": "acme", "scope": "infer", "iss": ISSUER, "aud": AUDIENCE,
            "iat": now, "exp": now + 300}
    merged = {**base, **overrides}
    return {k: now + v.seconds if isinstance(v, FromNow) else v for k, v in merged.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_by_hand(payload: dict, key: bytes) -> str:
    """PyJWT refuses to sign HS256 with a PEM key; an attacker does not ask it."""
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def rejected(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(EventError) as caught:
        verifier.verify(token)
    assert caught.value.code == ErrorCode.UNAUTHENTICATED
    assert not token or token not in caught.value.message  # never echo credentials
    return caught.value.message


def test_valid_hs256_token(verifier):
    principal = verifier.verify(jwt.encode(claims(scope="infer infer:tiny"), SECRET, algorithm="HS256"))
    assert principal == Principal("acme", "alice", frozenset({"infer", "infer:tiny"}), "jwt")


def test_valid_rs256_token_with_scope_list(verifier, rsa_key):
    token = jwt.encode(claims(scope=["infer:tiny"], sub=None), rsa_key, algorithm="RS256")
    principal = verifier.verify(token)
    assert (principal.tenant, principal.subject, principal.scopes) == ("acme", "acme", frozenset({"infer:tiny"}))


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"exp": FromNow(-60)}, "expired"),
        ({"nbf": FromNow(600)}, "not yet valid"),
        ({"exp": None}, "'exp'"),
        ({"aud": "someone-else"}, "audience"),
        ({"aud": None}, "'aud'"),
        ({"iss": "https://evil.example"}, "issuer"),
        ({"iss": None}, "'iss'"),
        ({"tenant": None}, "'tenant'"),
        ({"tenant": ""}, "'tenant'"),
        ({"tenant": "acme\u0000evil"}, "'tenant' claim must be"),
        ({"tenant": "a" * 65}, "'tenant' claim must be"),
        ({"tenant": "ac me"}, "'tenant' claim must be"),
        ({"tenant": "acmé"}, "'tenant' claim must be"),
        ({"tenant": "acme\n"}, "'tenant' claim must be"),
        ({"tenant": "../acme"}, "'tenant' claim must be"),
        ({"tenant": 42}, "'tenant' claim must be"),
        ({"tenant": ["acme"]}, "'tenant' claim must be"),
        ({"scope": 42}, "'scope' claim must be"),
        ({"scope": {"infer": True}}, "'scope' claim must be"),
        ({"scope": "infer\u0000"}, "'scope' claim must be"),
        ({"scope": "infer infer:t\u00efny"}, "'scope' claim must be"),
        ({"scope": ["infer", 7]}, "'scope' claim must be"),
        ({"scope": ["infer", ""]}, "'scope' claim must be"),
        ({"scope": ["infer:" + "m" * 123]}, "'scope' claim must be"),
        ({"scope": " ".join(f"infer:m{i}" for i in range(MAX_SCOPES + 1))}, "'scope' claim must be"),
        ({"scope": [f"infer:m{i}" for i in range(MAX_SCOPES + 1)]}, "'scope' claim must be"),
    ],
)
def test_bad_claims_are_rejected(verifier, overrides, reason):
    token = jwt.encode(claims(**overrides), SECRET, algorithm="HS256")
    message = rejected(verifier, token)
    assert reason in message
    for value in overrides.values():  # the message never quotes a claim's contents
        assert not isinstance(value, str) or len(value) < 8 or value not in message


def test_claims_at_the_limits_are_accepted(verifier):
    tenant = "Az09._:@-" + "t" * 55
    scopes = ["infer", "infer:" + "m" * 122] + [f"infer:v1/m-{i}.x_*" for i in range(MAX_SCOPES - 2)]
    principal = verifier.verify(jwt.encode(claims(tenant=tenant, scope=scopes), SECRET, algorithm="HS256"))
    assert (principal.tenant, principal.scopes) == (tenant, frozenset(scopes))
    empty = verifier.verify(jwt.encode(claims(scope=""), SECRET, algorithm="HS256"))
    assert empty.scopes == frozenset()


def test_exp_is_optional_only_when_configured(public_pem):
    token = jwt.encode(claims(exp=None), SECRET, algorithm="HS256")
    lenient = JwtVerifier(["HS256"], hs_secret=SECRET, issuer=ISSUER, audience=AUDIENCE, require_exp=False)
    assert lenient.verify(token).tenant == "acme"
    strict = JwtVerifier(["HS256"], hs_secret=SECRET, issuer=ISSUER, audience=AUDIENCE)
    assert "'exp'" in rejected(strict, token)
    expired = jwt.encode(claims(exp=FromNow(-60)), SECRET, algorithm="HS256")
    assert "expired" in rejected(lenient, expired)  # a present exp is still checked


def test_leeway_tolerates_small_clock_skew():
    lenient = JwtVerifier(["HS256"], hs_secret=SECRET, leeway_s=30)
    token = jwt.encode(claims(exp=FromNow(-10), aud=None), SECRET, algorithm="HS256")
    assert lenient.verify(token).tenant == "acme"


def test_bad_signature(verifier):
    assert "signature" in rejected(verifier, jwt.encode(claims(), "x" * 64, algorithm="HS256"))


def test_alg_none(verifier):
    token = jwt.encode(claims(), None, algorithm="none")
    assert "alg none" in rejected(verifier, token)


def test_algorithm_not_configured(verifier):
    assert "'HS512' is not accepted" in rejected(verifier, jwt.encode(claims(), SECRET, algorithm="HS512"))


def test_hs256_signed_with_the_public_key_is_rejected(verifier, public_pem):
    forged = hs256_by_hand(claims(), public_pem.encode())
    rs_only = JwtVerifier(["RS256"], rs_public_key=public_pem, issuer=ISSUER, audience=AUDIENCE)
    assert "'HS256' is not accepted" in rejected(rs_only, forged)
    # With HS256 configured too, its key is the shared secret, never the public key.
    assert "signature" in rejected(verifier, forged)


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "not-base64!.x.y"])
def test_malformed_tokens(verifier, token):
    assert "malformed" in rejected(verifier, token)


def test_configuration_is_checked(public_pem):
    with pytest.raises(ValueError, match="none"):
        JwtVerifier(["none"])
    with pytest.raises(ValueError, match="hs_secret"):
        JwtVerifier(["HS256"])
    with pytest.raises(ValueError, match="rs_public_key"):
        JwtVerifier(["RS256"], hs_secret=SECRET)
    with pytest.raises(ValueError, match="cannot be used"):
        JwtVerifier(["HS256"], hs_secret=public_pem)  # a PEM as HMAC secret invites confusion
    with pytest.raises(ValueError, match="cannot be used"):
        JwtVerifier(["RS256"], rs_public_key="not a key")
    with pytest.raises(ValueError, match="cannot be used"):
        JwtVerifier(["ES256"], rs_public_key=public_pem)  # an RSA key for an EC algorithm
    with pytest.raises(ValueError, match="unsupported"):
        JwtVerifier(["XS256"], hs_secret=SECRET)


def test_scopes_allow_models():
    def principal(*scopes):
        return Principal("acme", "alice", frozenset(scopes), "jwt")

    assert principal("infer").allows("tiny")
    assert principal("infer:tiny").allows("tiny")
    assert not principal("infer:tiny").allows("resnet18")
    assert not principal("admin").allows("tiny")
    with pytest.raises(EventError) as caught:
        principal("infer:tiny").authorize("resnet18")
    assert caught.value.code == ErrorCode.FORBIDDEN
    principal("infer:tiny").authorize("tiny")


def test_api_key_format_and_hash():
    key_id, secret, full = new_api_key()
    assert full == f"isk_{key_id}_{secret}" and len(key_id) == 12 and len(secret) >= 43
    assert parse_api_key(full) == (key_id, secret)
    assert new_api_key()[2] != full
    stored = hash_secret(secret, "pepper")
    assert len(stored) == 64 and secret not in stored
    assert secret_matches(secret, stored, "pepper")
    assert not secret_matches(secret, stored, "other-pepper")
    assert not secret_matches(secret[:-1] + "A" if secret[-1] != "A" else "B", stored, "pepper")


@pytest.mark.parametrize(
    "full", ["", "isk_", "isk_0123456789ab", "isk_0123456789ab_short", "sk_0123456789ab_" + "a" * 43,
             "isk_0123456789AB_" + "a" * 43, "isk_0123456789ab_" + "a" * 42 + "!"],
)
def test_malformed_api_keys(full):
    with pytest.raises(EventError) as caught:
        parse_api_key(full)
    assert (caught.value.code, caught.value.message) == (ErrorCode.UNAUTHENTICATED, INVALID_API_KEY)


class KnownEntries(ApiKeyStore):
    """The key store's checks over fixed lookup results (what PostgreSQL or the cache would hold)."""

    def __init__(self, entries: dict) -> None:
        super().__init__(pool=None, redis=None, pepper="pepper")  # type: ignore[arg-type]
        self.entries = entries

    async def _entry(self, key_id: str) -> dict:
        return self.entries.get(key_id, {"state": "unknown"})


async def test_every_api_key_failure_answers_the_same():
    active_id, secret, active = new_api_key()
    revoked_id, revoked_secret, revoked = new_api_key()
    store = KnownEntries({
        active_id: {"state": "active", "tenant": "acme", "scopes": ["infer"], "hash": hash_secret(secret, "pepper")},
        revoked_id: {"state": "revoked"},
    })
    assert (await store.verify(active)).tenant == "acme"
    answers = set()
    for full in [new_api_key()[2], revoked, f"isk_{active_id}_{new_api_key()[1]}", "isk_nope", active + "!"]:
        with pytest.raises(EventError) as caught:
            await store.verify(full)
        answers.add((caught.value.code, caught.value.message))
    assert answers == {(ErrorCode.UNAUTHENTICATED, INVALID_API_KEY)}


@pytest.mark.parametrize(
    ("tenant", "scopes", "problem"),
    [
        ("acme\u0000", ["infer"], "tenant"), ("", ["infer"], "tenant"), ("a" * 65, ["infer"], "tenant"),
        ("ac me", ["infer"], "tenant"), ("acme", ["infer model"], "scope"), ("acme", [""], "scope"),
        ("acme", ["infer", "infer\u0000"], "scope"), ("acme", ["infer"] * (MAX_SCOPES + 1), "scopes"),
    ],
)
async def test_keys_are_not_issued_to_bad_tenants_or_scopes(tenant, scopes, problem):
    with pytest.raises(ValueError, match=rf"^{problem}\b.* (is not valid: use|allowed)"):
        check_tenant_and_scopes(tenant, scopes)
    with pytest.raises(ValueError, match=rf"^{problem}\b"):  # refused before the database is touched
        await KnownEntries({}).create(tenant, scopes)


async def test_authenticator_paths(verifier):
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    optional = Authenticator(verifier, None, required=False)
    required = Authenticator(verifier, None, required=True)
    assert (await optional.authenticate(Credentials(authorization=f"Bearer {token}"))).method == "jwt"
    assert await optional.authenticate(None) is ANONYMOUS
    assert await optional.authenticate(Credentials()) is ANONYMOUS
    for auth, credentials in [
        (required, None),
        (required, Credentials()),
        (optional, Credentials(authorization="Bearer not-a-jwt")),  # present but invalid
        (optional, Credentials(authorization=f"Basic {token}")),
        (optional, Credentials(authorization="Bearer ")),
        (optional, Credentials(api_key="isk_0123456789ab_" + "a" * 43)),  # no key store here
        (optional, Credentials(authorization=f"Bearer {token}", api_key="isk_x")),
        (Authenticator(None, None, required=False), Credentials(authorization=f"Bearer {token}")),
    ]:
        with pytest.raises(EventError) as caught:
            await auth.authenticate(credentials)
        assert caught.value.code == ErrorCode.UNAUTHENTICATED


@pytest.mark.parametrize(("args", "message"), [
    (["keys", "create", "--tenant", "ac me"], "tenant 'ac me' is not valid"),
    (["keys", "create", "--tenant", "acme", "--scope", "infer", "--scope", "infer tiny"],
     "scope 'infer tiny' is not valid"),
    (["limits", "set", "ac\x00me", "10"], "is not valid"),
    (["limits", "clear", "x" * 65], "1-64 characters"),
])
def test_cli_refuses_a_bad_tenant_or_scope_before_connecting(args, message, monkeypatch):
    from typer.testing import CliRunner

    from streams.cli import app, keys, limits

    for group in (keys, limits):
        monkeypatch.setattr(group, "with_stores", lambda *args: pytest.fail("the stores were reached"))
    result = CliRunner().invoke(app.app, args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_sealed_principal_round_trips_and_malformed_claims_name_nobody():
    alice = Principal(tenant="acme", subject="alice", scopes=frozenset({"infer", "admin"}), method="jwt")
    assert principal_from_claims(principal_claims(alice)) == alice
    assert principal_from_claims(principal_claims(ANONYMOUS)) is ANONYMOUS
    for claims in (None, "acme", {}, {**principal_claims(alice), "method": "root"},
                   {**principal_claims(alice), "tenant": "bad tenant!"},
                   {**principal_claims(alice), "scopes": "infer"}, {**principal_claims(alice), "subject": 7}):
        assert principal_from_claims(claims) is None, claims
