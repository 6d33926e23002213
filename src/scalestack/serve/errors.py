"""The errors a client sees: an HTTP status, an OpenAI error type and code, a message that names the fix."""

from __future__ import annotations


class ServeError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 type: str = "invalid_request_error"):  # fmt: skip
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.type = status, code, message, param, type

    def body(self) -> dict:
        """The ``error`` object of an HTTP error body and of a WebSocket ``error`` event."""
        return {"type": self.type, "code": self.code, "message": self.message, "param": self.param}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ServeError:
    return ServeError(400, code, message, param)
