"""The request/response pattern over HTTP/1.1: the smallest server on iokit's shared HTTP core.

    GET /            a short text greeting        HEAD /        the same head, no body
    POST /echo       the request body back (Content-Length or chunked, at most 1 MiB)
    GET /delay?ms=N  answers after N milliseconds (0..10000): a slow handler, to show concurrency per backend

Everything else (keep-alive, pipelining, 100-continue, limits, errors as JSON) is the core's, in ``iokit.http``.
Run: ``python examples/http_server.py --backend epoll --port 8080`` (``--help`` lists every limit as a flag).
"""

from __future__ import annotations

import sys

import iokit
from iokit import serve
from iokit.http.client_input import read_integer
from iokit.http import App, HttpError, HttpLimits, HttpServer, Response, cors

MAX_DELAY_MS = 10_000
GREETING = b"hello from iokit\n"

app = App()


@app.route("GET", "/")
async def index(request):
    return Response(200, GREETING, content_type="text/plain; charset=utf-8")


@app.route("POST", "/echo")
async def echo(request):
    body = await request.read_body()
    return Response(200, body, content_type=request.headers.get("content-type", "application/octet-stream"))


@app.route("GET", "/delay")
async def delay(request):
    text = request.query.get("ms", "")
    milliseconds = read_integer(text)
    if milliseconds is None or milliseconds > MAX_DELAY_MS:
        raise HttpError(400, f"ms must be an integer from 0 to {MAX_DELAY_MS}, not {text[:40]!r}")
    await iokit.sleep(milliseconds / 1000)
    return Response.json({"delayed_ms": milliseconds})


def main(argv: list[str] | None = None) -> int:
    parser = serve.argument_parser(__doc__.splitlines()[0], HttpLimits)
    cors.add_argument(parser)
    return serve.main(lambda arguments: HttpServer(app, serve.limits_from_arguments(arguments, HttpLimits),
                                                   cors=cors.policy_from_arguments(arguments)), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
