"""The one error type the server answers with (OpenAI's error body)."""

from __future__ import annotations


class ApiError(Exception):
    """A request the server refuses: HTTP status, a message naming the problem,
    and the request field (`param`, a dotted path) it concerns when there is one."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _default_type(status)
        self.code = code

    def body(self) -> dict:
        """The OpenAI-style JSON error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def request_error(exc: BaseException) -> ApiError:
    """The answer for a request the engine finished with `finish_reason="error"`.

    A leaf too large for the KV pool is the request's fault (400: shorter
    prompt or max_tokens); non-finite logits are the model's (500)."""
    from dendrite.engine import LeafTooLarge, ModelOutputError

    if isinstance(exc, LeafTooLarge):
        return ApiError(400, f"the request does not fit the server's KV cache: {exc}",
                        param="max_tokens")
    if isinstance(exc, ModelOutputError):
        return ApiError(500, f"the model produced non-finite logits for this request: {exc}")
    return ApiError(500, f"the engine failed this request: {type(exc).__name__}: {exc}")
