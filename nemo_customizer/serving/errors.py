"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with a matching HTTP status.

The official ``openai`` client turns these into its own exceptions (``BadRequestError``, ``AuthenticationError``,
``NotFoundError``, ...) carrying the message, so a user sees what to fix. Pure Python: no FastAPI here.
"""

from __future__ import annotations

from typing import Any, Dict, Optional


class APIError(Exception):
    """A request the server refuses; becomes an OpenAI-shaped error response with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> Dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> Dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, *, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str, available: list) -> APIError:
    return APIError(404, f"The model {model!r} does not exist on this server; available models: "
                         f"{', '.join(available)} (GET /v1/models lists them).", param="model",
                    code="model_not_found")
