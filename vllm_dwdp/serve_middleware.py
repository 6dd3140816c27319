"""ASGI middleware that ``vllm-dwdp serve`` adds to each rank's OpenAI server.

- Every response carries ``X-DWDP-Rank: N``, so a client behind the router sees which rank
  answered it.
- A request that carries an ``X-DWDP-Rank`` header gets a 400 that says where pinning went:
  the router balances load itself, and a client that wants one rank sends to that rank's
  own port (``--rank-base-port + N`` on 127.0.0.1).

The launcher passes the rank in ``VLLM_DWDP_SERVE_RANK``. Plain ASGI (not Starlette's
``BaseHTTPMiddleware``), so streamed responses pass through without extra copies.
"""

from __future__ import annotations

import json
import os

HEADER = b"x-dwdp-rank"
RANK_ENV = "VLLM_DWDP_SERVE_RANK"
PORT_HELP = ("send the request to that rank's own port on 127.0.0.1 "
             "(rank N listens on --rank-base-port + N, by default --port + 1 + N)")


class RankHeader:
    def __init__(self, app):
        self.app = app
        self.rank = os.environ.get(RANK_ENV, "").encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == HEADER:
                return await self._reject(value, send)

        async def send_with_rank(message):
            if message["type"] == "http.response.start" and self.rank:
                message["headers"] = [*message.get("headers", ()), (HEADER, self.rank)]
            await send(message)

        return await self.app(scope, receive, send_with_rank)

    async def _reject(self, value: bytes, send) -> None:
        msg = (f"X-DWDP-Rank: {value.decode('latin-1')!r}: vllm-dwdp serve no longer pins "
               f"requests by header; its router picks the least loaded rank. To reach one "
               f"rank, drop the header and {PORT_HELP}.")
        body = json.dumps({"error": {"message": msg, "type": "BadRequestError",
                                     "param": "X-DWDP-Rank", "code": 400}}).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        if self.rank:
            headers.append((HEADER, self.rank))
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body})
