"""One error shape for every endpoint: ``{"error": {"message", "type", "param", "code"}}``.

This is the OpenAI error object, so OpenAI clients raise their usual exceptions on
``/v1``; the other endpoints use the same shape so clients need one parser. Bad input is
always a 4xx with a message saying what is wrong and how to fix it, never a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.schemas import ErrorResponse

log = logging.getLogger(__name__)

#: ``type`` of the error object by HTTP status. Any other 4xx is an invalid request, any
#: 5xx a server error (``error_type``).
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}

#: What each status means, for the routes' ``responses=`` (OpenAPI, /docs).
_MEANINGS: dict[int | str, str] = {
    400: "Bad input: the message names the field (param) and how to fix it.",
    401: "Missing or invalid API key (see WWW-Authenticate).",
    404: "Not found (for /v1: a model this server does not serve).",
    409: "Conflict with the current state (e.g. a model version that fails verification).",
    413: "Request body over QUARK_MAX_BODY_BYTES.",
    500: "Unexpected server error (type server_error); the server log has details.",
    503: "Queue full, model not loaded yet, or a dependency down (see Retry-After).",
    # Also keeps FastAPI from documenting a 422 body this app never sends (bad input: 400).
    "4XX": "Any other client error, with the same error object.",
}


def error_type(status: int) -> str:
    """The error object's ``type`` for an HTTP status."""
    if status in _TYPES:
        return _TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def error_responses(*statuses: int | str) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: each status (or range, "4XX") answers the error object."""
    return {
        status: {"model": ErrorResponse, "description": _MEANINGS.get(status, "An error.")}
        for status in statuses
    }


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status (and headers)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or error_type(status)
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _field(loc: Sequence[int | str]) -> str | None:
    """``('body', 'messages', 0, 'role')`` -> ``messages[0].role``."""
    parts = [p for p in loc if p not in ("body", "query")]
    name = ""
    for part in parts:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or None


_CODES = {"missing": "missing_field", "string_unicode": "invalid_unicode"}


def validation_error(errors: Sequence[Any]) -> APIError:
    """Readable message from pydantic/FastAPI validation errors (first error names param)."""
    first: dict[str, Any] = dict(errors[0]) if errors else {"type": "value_error", "loc": ()}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return bad_request(
            f"request body is not valid JSON ({detail}); send a JSON object with "
            "Content-Type: application/json",
            code="invalid_json",
        )
    messages = []
    for err in errors[:5]:
        field = _field(err.get("loc", ()))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "missing" and field is None:
            msg = "request body is missing: send a JSON object"
        elif err.get("type") == "extra_forbidden":
            msg = "unknown field; check its spelling against the API documentation"
        elif err.get("type") == "model_attributes_type" and field is None:
            msg = "request body must be a JSON object"
        messages.append(f"{field}: {msg}" if field else msg)
    code = _CODES.get(first.get("type", ""), "invalid_value")
    # A validator that checks a whole body names the offending field in ctx["param"].
    param = (first.get("ctx") or {}).get("param") or _field(first.get("loc", ()))
    return bad_request("; ".join(messages), param=param, code=code)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error(exc.errors()).response()


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = str(exc.detail)
    if exc.status_code == 404:
        message = f"no route {request.url.path}; see /docs for the API"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; see /docs"
    return APIError(exc.status_code, message, headers=exc.headers).response()


def unexpected_error(method: str, path: str, exc: BaseException) -> APIError:
    """Log an exception no handler knew, and the 500 that answers it."""
    log.error("unhandled error on %s %s", method, path, exc_info=exc)
    return APIError(500, "internal server error; the server log has details")


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Only reached for an error UnexpectedErrorMiddleware could not answer (Starlette's
    # ServerErrorMiddleware calls this, then re-raises, and the server drops the connection).
    return unexpected_error(request.method, request.url.path, exc).response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
