"""The shared HTTP/1.1 core of the example servers: parse with httptools, frame responses, serve on any backend.

A server is an ``App`` of routes whose handlers take a ``Request`` and return a ``Response``; ``HttpServer(app, limits)``
serves it, and ``iokit.serve.main`` gives it the command line, workers and a clean stop::

    from iokit import serve
    from iokit.http import App, HttpLimits, HttpServer, Response

    app = App()

    @app.route("GET", "/")
    async def index(request):
        return Response(200, b"hello\\n", content_type="text/plain")

    parser = serve.argument_parser("hello")
    serve.add_limit_arguments(parser, HttpLimits)
    serve.main(lambda args: HttpServer(app, serve.limits_from_arguments(args, HttpLimits)), parser)

The parts: ``limits`` (every bound, in one place), ``parser`` (sans-IO request parser), ``response`` (framing),
``routing`` (routes, 404/405), ``server`` (the connection loop on the runtime).
"""

from .errors import BodyIncomplete, HttpError
from .limits import DEFAULT_LIMITS, HttpLimits
from .messages import Headers
from .response import Response
from .routing import App
from .server import HttpServer, Request

__all__ = ["App", "BodyIncomplete", "DEFAULT_LIMITS", "Headers", "HttpError", "HttpLimits", "HttpServer", "Request",
           "Response"]
