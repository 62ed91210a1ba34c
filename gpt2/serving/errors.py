"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so that its clients
report them as they report OpenAI's: a 4xx status for anything the client can fix (``APIError``, and
FastAPI's and Starlette's own errors converted by the handlers ``install_error_handlers`` adds); a 500
(``failure``) says only that the server failed, with an id that finds its traceback in the log, where
the exception's message is cut to ``LOGGED_CHARS`` (a message may quote a megabyte of the request).
``error_of`` is the one way from an exception to its answer, for a stream's last event too.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from gpt2.util.errors import UserError, bounded

log = logging.getLogger("gpt2.serving")
LOGGED_CHARS = 1000  # of an exception's message in the log


class APIError(Exception):
    """An error answered as OpenAI's error JSON with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def payload(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0]
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                        code="invalid_json")
    param = where[0] if where else None
    if len(errors) > 1 and len({e["loc"][:2] for e in errors}) == 1:  # every type of a union refused it
        takes = ", ".join(dict.fromkeys(str(e["loc"][2]) for e in errors if len(e["loc"]) > 2))
        got = type(first.get("input")).__name__
        return APIError(400, f"{param}: got a value of type {got}, expected one of: {takes}", param=param,
                        code="invalid_type")
    return APIError(400, f"{'.'.join(where) or 'body'}: {first['msg']}", param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Answer ``APIError``, ``UserError`` (a 400) and FastAPI's and Starlette's errors in OpenAI's shape."""

    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def user_error(_: Request, exc: UserError) -> JSONResponse:
        return error_of(exc).response()

    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    async def http(request: Request, exc: HTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{message}: {request.method} {request.url.path}"
        return APIError(exc.status_code, message, code=_HTTP_CODES.get(exc.status_code)).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(UserError, user_error)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(HTTPException, http)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_of(exc: BaseException) -> APIError:
    """The answer to ``exc``: itself if an ``APIError``, a 400 if a ``UserError`` (its ``param`` named,
    if it has one), else the 500 of ``failure``."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UserError):
        return APIError(400, str(exc), param=getattr(exc, "param", None), code="invalid_value")
    return failure(exc)


class _Logged(Exception):
    """An exception as logged: its type and message, cut to ``LOGGED_CHARS``, with its traceback."""


def failure(exc: BaseException) -> APIError:
    """The 500 for ``exc``: its traceback goes to the log under an id (its message cut to
    ``LOGGED_CHARS``), the client gets only the id."""
    error_id = uuid.uuid4().hex[:12]
    logged = _Logged(bounded(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}", LOGGED_CHARS))
    log.error("request failed (error id %s)", error_id, exc_info=logged.with_traceback(exc.__traceback__))
    return APIError(500, f"the server failed (error id {error_id}; the server's log has the details)",
                    type="server_error", code="internal_error")
