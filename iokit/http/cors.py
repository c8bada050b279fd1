"""Cross-origin requests (the Fetch standard's CORS protocol), so that a page served from elsewhere can use a server.

A browser lets a page on ``https://app.example`` read a response from our server only if the response says that origin
may (``Access-Control-Allow-Origin``), and it shows the page only the response headers we list
(``Access-Control-Expose-Headers``): tus clients must read ``Location`` and ``Upload-Offset``, pollers ``ETag`` and
``Retry-After``. A request that is not "simple" (a PATCH, a ``Tus-Resumable`` header, a JSON body) is first asked about
with a *preflight*: ``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``, answered here before any route
sees it.

Nothing is allowed by default: a server lists its origins (``--cors-origin``, repeatable; ``*`` for any page, which
also means no credentials). An origin not listed gets no CORS header at all, so its page cannot read the answer, and
every response of a server with a policy says ``Vary: Origin``, so that a cache never hands one origin's answer to
another. The server calls ``CorsPolicy.preflight`` before routing and ``CorsPolicy.decorate`` on every response; the
rest of the HTTP core knows nothing of CORS.
"""

from __future__ import annotations

import argparse
import urllib.parse

from .response import Response

# What the servers' pages and clients read from a response: tus (creation, offsets, expiry), polling, push, errors.
EXPOSED_HEADERS = ("Location", "Upload-Offset", "Upload-Length", "Tus-Resumable", "Tus-Version", "Tus-Max-Size",
                   "Tus-Extension", "Tus-Checksum-Algorithm", "Upload-Expires", "Upload-Metadata", "Upload-Concat",
                   "Iokit-Durable-Offset", "ETag", "Retry-After", "Idempotent-Replayed")
# What a cross-origin page may send beyond the CORS-safelisted headers.
ALLOWED_REQUEST_HEADERS = ("Content-Type", "Tus-Resumable", "Upload-Length", "Upload-Offset", "Upload-Metadata",
                           "Upload-Checksum", "Upload-Concat", "Upload-Defer-Length", "X-HTTP-Method-Override",
                           "X-Requested-With", "Last-Event-ID", "Idempotency-Key", "If-None-Match", "Cache-Control")
ALLOWED_METHODS = ("GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS")
PREFLIGHT_MAX_AGE_SECONDS = 600
ANY_ORIGIN = "*"


def parse_origin(text: str) -> str:
    """Return ``text`` as an origin the way a browser sends it (``scheme://host[:port]``, lower case, no default port,
    no path), or ``*``. Raises ``ValueError`` otherwise."""
    text = text.strip()
    if text == ANY_ORIGIN:
        return text
    parts = urllib.parse.urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (parts.scheme not in ("http", "https") or not parts.hostname or port == -1 or parts.path not in ("", "/")
            or parts.query or parts.fragment or parts.username is not None):
        raise ValueError(f"an origin is scheme://host[:port] (http or https, no path), or *; not {text!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default_port = 80 if parts.scheme == "http" else 443
    return f"{parts.scheme}://{host}" + ("" if port in (None, default_port) else f":{port}")


def _origin_argument(text: str) -> str:
    try:
        return parse_origin(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class CorsPolicy:
    """The origins whose pages may use a server, and the headers that say so."""

    def __init__(self, origins: tuple[str, ...] | list[str]):
        self.origins = frozenset(parse_origin(origin) for origin in origins)
        self.any_origin = ANY_ORIGIN in self.origins
        self._preflight_fields = (
            ("Access-Control-Allow-Methods", ", ".join(ALLOWED_METHODS)),
            ("Access-Control-Allow-Headers", ", ".join(ALLOWED_REQUEST_HEADERS)),
            ("Access-Control-Max-Age", str(PREFLIGHT_MAX_AGE_SECONDS)))
        self._exposed = ", ".join(EXPOSED_HEADERS)

    def allows(self, origin: str | None) -> bool:
        return origin is not None and (self.any_origin or origin.lower() in self.origins)

    def preflight(self, method: str, headers) -> Response | None:
        """Return the answer to a preflight from an allowed origin (204 and what it may do), or ``None``: not a
        preflight, or one from an origin not listed (the route answers it then, without CORS headers, and the browser
        refuses the page's request)."""
        if method != "OPTIONS" or "access-control-request-method" not in headers:
            return None
        origin = headers.get("origin")
        if not self.allows(origin):
            return None
        return Response(204, headers=[*self._allow_origin(origin), *self._preflight_fields])

    def decorate(self, headers, response: Response) -> None:
        """Add to ``response`` what lets the page of the request's ``Origin`` read it, if that origin is allowed, and
        ``Vary: Origin`` in any case (the answer depends on it)."""
        response.headers.append(("Vary", "Origin"))
        origin = headers.get("origin")
        if self.allows(origin) and response.header("access-control-allow-origin") is None:
            response.headers += [*self._allow_origin(origin), ("Access-Control-Expose-Headers", self._exposed)]

    def _allow_origin(self, origin: str) -> list[tuple[str, str]]:
        # "*" is sent as such only for any origin; a listed one is echoed, as the standard wants for one origin.
        return [("Access-Control-Allow-Origin", ANY_ORIGIN if self.any_origin else origin)]


def add_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--cors-origin ORIGIN`` (repeatable) to an HTTP server's command line."""
    parser.add_argument("--cors-origin", dest="cors_origins", action="append", default=[], metavar="ORIGIN",
                        type=_origin_argument,
                        help="let pages from ORIGIN (scheme://host[:port], or * for any page) use this server from a "
                             "browser: preflights answered, the tus/polling/SSE headers exposed; repeat for more "
                             "(default: none, only pages the server itself serves)")


def policy_from_arguments(arguments: argparse.Namespace) -> CorsPolicy | None:
    """Return the policy ``--cors-origin`` asked for, or ``None`` when it was not given."""
    return CorsPolicy(arguments.cors_origins) if arguments.cors_origins else None
