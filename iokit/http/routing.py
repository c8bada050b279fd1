"""Routes: which handler answers a method and a path, and what a path that exists but not for this method answers.

An example server is a handful of routes, so the table is a list of compiled patterns tried in order. A pattern is a path
with ``{name}`` segments (``/files/{upload_id}``); a segment matches one non-empty path segment and reaches the handler
percent-decoded in ``request.path_params``. A path that matches with another method gets 405 and the ``Allow`` list; a GET
route answers HEAD too (the server sends its head without the body), as RFC 9110 section 9.3.2 expects.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from typing import Awaitable, Callable

from .errors import HttpError
from .response import Response

Handler = Callable[["Request"], Awaitable[Response]]  # noqa: F821 - Request lives in server.py

# A route's body cap: this sentinel means "the server's HttpLimits.max_body_bytes"; None means no cap (stream it).
DEFAULT_BODY_CAP = object()
_MAX_REMEMBERED = 1024  # (method, path) pairs App.resolve keeps the route of
_SEGMENT_PARAMETER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclasses.dataclass(frozen=True)
class Route:
    """One method and path pattern, its handler and its body cap (``DEFAULT_BODY_CAP``, a byte count, or ``None``)."""

    method: str
    pattern: str
    handler: Handler
    max_body_size: object
    regex: re.Pattern

    def match(self, path: str) -> dict[str, str] | None:
        """Return the decoded path parameters if ``path`` (still percent-encoded) matches, else ``None``."""
        found = self.regex.fullmatch(path)
        if found is None:
            return None
        return {name: urllib.parse.unquote(value) for name, value in found.groupdict().items()}


@dataclasses.dataclass(frozen=True)
class RouteMatch:
    route: Route
    path_params: dict[str, str]


class App:
    """A set of routes; the HTTP server calls ``resolve`` for each request.

    Usage::

        app = App()

        @app.route("GET", "/")
        async def index(request):
            return Response(200, b"hello\\n", content_type="text/plain")
    """

    def __init__(self) -> None:
        self._routes: list[Route] = []
        # (method, path) -> the match found for it: a resolution depends on nothing else, and most requests of a
        # server ask for a handful of paths. Only found routes without parameters are kept, and only so many.
        self._found: dict[tuple[str, str], RouteMatch] = {}

    def route(self, method: str, pattern: str, *, max_body_size: object = DEFAULT_BODY_CAP):
        """Return a decorator that adds its function as the handler of ``method`` on ``pattern``.

        ``max_body_size`` caps the request body (413 past it): by default the server's ``HttpLimits.max_body_bytes``,
        ``None`` for no cap (a handler that streams the body with ``request.body()`` and bounds it itself).
        """
        def add(handler: Handler) -> Handler:
            self.add_route(method, pattern, handler, max_body_size=max_body_size)
            return handler
        return add

    def add_route(self, method: str, pattern: str, handler: Handler, *,
                  max_body_size: object = DEFAULT_BODY_CAP) -> None:
        """Add ``handler`` for ``method`` on ``pattern``. Raises ``ValueError`` for a pattern not starting with ``/``."""
        if not pattern.startswith("/") and pattern != "*":
            raise ValueError(f"a route pattern starts with '/': {pattern!r}")
        pieces = _SEGMENT_PARAMETER.split(pattern)  # literal, name, literal, name, ..., literal
        regex = re.compile("".join(re.escape(piece) if index % 2 == 0 else f"(?P<{piece}>[^/]+)"
                                   for index, piece in enumerate(pieces)))
        self._routes.append(Route(method.upper(), pattern, handler, max_body_size, regex))
        self._found.clear()

    def resolve(self, method: str, path: str) -> RouteMatch:
        """Return the route for ``method`` and ``path``.

        Raises ``HttpError(404)`` when no route has this path, ``HttpError(405)`` with ``Allow`` when some do, for other
        methods. A match without path parameters is remembered and handed out again: do not change its dict.
        """
        found = self._found.get((method, path))
        if found is not None:
            return found
        match = self._search(method, path)
        if not match.path_params and len(self._found) < _MAX_REMEMBERED:
            self._found[(method, path)] = match
        return match

    def _search(self, method: str, path: str) -> RouteMatch:
        allowed: list[str] = []
        for route in self._routes:
            params = route.match(path)
            if params is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                if method == "HEAD" and route.method == "GET" and self._has_explicit(path, "HEAD"):
                    continue
                return RouteMatch(route, params)
            allowed.append(route.method)
        if not allowed:
            raise HttpError(404, f"no resource at {path}")
        raise HttpError(405, f"{method} is not allowed on {path}", headers=[("Allow", _allow_value(allowed))])

    def allowed_methods(self) -> str:
        """Return the ``Allow`` value listing every method some route answers (for a method no route could know)."""
        return _allow_value(route.method for route in self._routes)

    def _has_explicit(self, path: str, method: str) -> bool:
        return any(route.method == method and route.match(path) is not None for route in self._routes)


def _allow_value(methods) -> str:
    methods = set(methods)
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))
