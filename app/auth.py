"""Bearer-token checks: optional API keys for generation, a mandatory admin token."""

from __future__ import annotations

import hmac

from fastapi import Request

from app.deps import SettingsDep
from app.errors import APIError

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="quark-serve"'}


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def token_matches(token: str, accepted: list[str]) -> bool:
    """Constant-time comparison against every accepted token (no early exit)."""
    found = False
    for candidate in accepted:
        found |= hmac.compare_digest(token.encode(), candidate.encode())
    return found


def _unauthorized(message: str, code: str) -> APIError:
    return APIError(401, message, code=code, headers=_CHALLENGE)


async def require_api_key(request: Request, settings: SettingsDep) -> None:
    """Generation endpoints: open when QUARK_API_KEYS is empty, else a listed key."""
    if not settings.api_keys:
        return
    token = bearer_token(request)
    if token is None:
        raise _unauthorized(
            "missing API key: send 'Authorization: Bearer <key>' with a key from QUARK_API_KEYS",
            "missing_api_key",
        )
    if not token_matches(token, settings.api_keys):
        raise _unauthorized("invalid API key", "invalid_api_key")


async def require_admin(request: Request, settings: SettingsDep) -> None:
    """``/admin``: ``Authorization: Bearer <QUARK_ADMIN_TOKEN>``, always. Only an app built
    with QUARK_INSECURE_DEV=1 and no token (it warns at startup) lets everyone in."""
    if not settings.admin_token:
        if settings.insecure_dev:
            return
        raise APIError(503, "admin API disabled: QUARK_ADMIN_TOKEN is not set", code="no_admin")
    token = bearer_token(request)
    if token is None:
        raise _unauthorized(
            "admin endpoints need 'Authorization: Bearer <QUARK_ADMIN_TOKEN>'", "missing_token"
        )
    if not token_matches(token, [settings.admin_token]):
        raise _unauthorized("invalid admin token", "invalid_token")
