"""With auth required, a worker or bridge refuses an empty, short or placeholder JWT secret or
API key pepper (streams.settings.refuse_placeholder_secrets), in one line."""

import pytest

from streams.bridge.app import run_bridge
from streams.settings import Settings, placeholder_reason, refuse_placeholder_secrets
from streams.worker.app import run_worker

GOOD = "kq3V9xT0b7LwYp2Zr8sD1fGh6JmN4cQe"  # 32 random bytes of base64-ish text


def settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)


@pytest.mark.parametrize(("value", "reason"), [
    ("", "is empty"),
    ("CHANGE_ME", "shorter than 32 bytes"),
    (GOOD[:31], "shorter than 32 bytes"),
    ("CHANGE_ME" * 4, "placeholder ('changeme')"),
    ("change-me-local-pepper-for-compose-0123", "placeholder ('changeme')"),
    ("changeme-changeme-changeme-changeme", "placeholder ('changeme')"),
    ("inferstream-dev-cluster-secret-but-longer", "placeholder ('inferstreamdev')"),
    ("<placeholder: a 32-byte random secret here>", "placeholder ('placeholder')"),
])
def test_placeholders_are_named(value, reason):
    assert reason in placeholder_reason(value)


def test_a_random_secret_passes():
    assert placeholder_reason(GOOD) is None
    refuse_placeholder_secrets(settings(auth_required=True, jwt_hs_secret=GOOD, api_key_pepper=GOOD[::-1]))


def test_without_auth_the_dev_defaults_pass():
    refuse_placeholder_secrets(settings(auth_required=False))


@pytest.mark.parametrize(("secrets", "named"), [
    ({"jwt_hs_secret": "", "api_key_pepper": GOOD}, "INFERSTREAM_JWT_HS_SECRET is empty"),
    ({"jwt_hs_secret": "CHANGE_ME", "api_key_pepper": GOOD}, "INFERSTREAM_JWT_HS_SECRET is shorter"),
    ({"jwt_hs_secret": GOOD}, "INFERSTREAM_API_KEY_PEPPER is shorter"),  # the dev default pepper
    ({"jwt_hs_secret": GOOD, "api_key_pepper": "CHANGE_ME" * 4}, "INFERSTREAM_API_KEY_PEPPER looks like"),
])
def test_auth_required_refuses_a_placeholder(secrets, named):
    with pytest.raises(ValueError, match="auth is required but") as refused:
        refuse_placeholder_secrets(settings(auth_required=True, **secrets))
    message = str(refused.value)
    assert named in message and "\n" not in message


def test_both_problems_in_one_line():
    with pytest.raises(ValueError) as refused:
        refuse_placeholder_secrets(settings(auth_required=True, jwt_hs_secret="", api_key_pepper="CHANGE_ME"))
    assert "INFERSTREAM_JWT_HS_SECRET" in str(refused.value) and "INFERSTREAM_API_KEY_PEPPER" in str(refused.value)


def test_an_empty_jwt_secret_passes_when_a_public_key_verifies_the_tokens():
    public_key = "-----BEGIN PUBLIC KEY-----\nMIIB...\n-----END PUBLIC KEY-----"
    refuse_placeholder_secrets(settings(auth_required=True, jwt_hs_secret="", jwt_public_key=public_key,
                                        api_key_pepper=GOOD))
    with pytest.raises(ValueError, match="INFERSTREAM_JWT_HS_SECRET"):  # a set HS secret is still checked
        refuse_placeholder_secrets(settings(auth_required=True, jwt_hs_secret="CHANGE_ME",
                                            jwt_public_key=public_key, api_key_pepper=GOOD))


def test_worker_and_bridge_refuse_before_they_connect():
    """Both check first: these settings point at nothing, so only the check can raise here."""
    placeholder = settings(auth_required=True, jwt_hs_secret="CHANGE_ME", api_key_pepper="CHANGE_ME",
                           bridge_host="127.0.0.1")
    with pytest.raises(ValueError, match="auth is required"):
        run_worker(placeholder, lambda app, pipeline, serve: None)
    with pytest.raises(ValueError, match="auth is required"):
        run_bridge(placeholder)
