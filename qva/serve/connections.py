"""The HTTP connections under the app: uvicorn's h11 protocol with the two limits it lacks.

- A request's head must arrive within `read_timeout` seconds: from the connection's opening, and again
  from the end of each answer on a kept-alive connection. A client that drips its headers gets a 408 and
  the connection is closed; one that has sent nothing is closed without an answer (a 408 written to an
  idle connection could be read as the answer to a request the client sends at that moment). The body
  has its own deadline in `app.read_body`; an idle kept-alive connection is also closed by uvicorn's
  `timeout_keep_alive`.
- At most `max_connections` are open. One more closes the oldest connection that is waiting for a
  request head (an idle or slow one), or, when every connection is in a request, the new one: a flood
  of idle connections cannot lock out clients that send their request at once.
"""

from __future__ import annotations

import json
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

_TIMEOUT_BODY = json.dumps({"error": {"message": "the request's headers did not arrive in time", "type": "invalid_request_error",
                                      "param": None, "code": "request_timeout"}}).encode()
TIMEOUT_ANSWER = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                  b"content-length: %d\r\n\r\n" % len(_TIMEOUT_BODY)) + _TIMEOUT_BODY


def protocol(read_timeout: float, max_connections: int) -> type:
    """The protocol class for `uvicorn.Config(http=...)` with these limits."""
    return type("QvaHTTP", (Guarded,), {"read_timeout": read_timeout, "max_connections": max_connections})


class Guarded(H11Protocol):
    """uvicorn's H11Protocol, plus the head deadline and the connection cap (set per server by `protocol`)."""

    read_timeout: float = 30.0
    max_connections: int = 512

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.opened, self.head_timer = time.monotonic(), None
        self._start_clock()
        if len(self.connections) > self.max_connections:
            idle = [c for c in self.connections if c is not self and isinstance(c, Guarded) and c.waiting_for_head()]
            (min(idle, key=lambda c: c.opened) if idle else self).transport.close()

    def waiting_for_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        self.head_started = True
        super().data_received(data)
        if not self.waiting_for_head():  # a request head arrived: the app's deadlines take over
            self._stop_clock()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.waiting_for_head():  # the next request's head has `read_timeout` seconds too
            self._start_clock()
        else:  # a pipelined request has already begun
            self._stop_clock()

    def connection_lost(self, exc) -> None:
        self._stop_clock()
        super().connection_lost(exc)

    def _start_clock(self) -> None:
        self._stop_clock()
        self.head_started = False
        self.head_timer = self.loop.call_later(self.read_timeout, self._late)

    def _stop_clock(self) -> None:
        if getattr(self, "head_timer", None) is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _late(self) -> None:
        self.head_timer = None
        if self.waiting_for_head() and not self.transport.is_closing():
            if self.head_started:
                self.transport.write(TIMEOUT_ANSWER)
            self.transport.close()
