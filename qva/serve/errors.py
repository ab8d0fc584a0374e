"""The one shape of a refusal: `APIError`, an HTTP status with OpenAI's error body.

Every module of the server raises these (requests, media, fetches) and `app.py` answers them as
`{"error": {"message", "type", "param", "code"}}`; kept apart so that `protocol.py`, `media.py` and
`fetch.py` share it without importing one another.
"""

from __future__ import annotations


class APIError(Exception):
    """A request the server refuses: HTTP `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param, code)
