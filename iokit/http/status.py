"""Reason phrases and error codes for HTTP statuses, by RFC 9110's names.

Python's ``http.HTTPStatus`` phrases changed between versions (413 was "Request Entity Too Large" before 3.13, "Content
Too Large" after), and the ``error`` code in our JSON error bodies is derived from the phrase, so clients would see it
change with the interpreter. The statuses our servers send are listed here once, with the RFC's current names; any other
falls back to Python's table.
"""

from __future__ import annotations

import http

_PHRASES = {
    100: "Continue", 200: "OK", 201: "Created", 202: "Accepted", 204: "No Content", 304: "Not Modified",
    400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    409: "Conflict", 410: "Gone", 412: "Precondition Failed", 413: "Content Too Large", 414: "URI Too Long",
    415: "Unsupported Media Type", 417: "Expectation Failed", 423: "Locked", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 460: "Checksum Mismatch", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported", 507: "Insufficient Storage",
}


def reason_phrase(status: int) -> str:
    """Return the reason phrase for ``status`` (``""`` for a status nobody named)."""
    if status in _PHRASES:
        return _PHRASES[status]
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def error_code(status: int) -> str:
    """Return the reason phrase of ``status`` in snake case (``413`` -> ``"content_too_large"``), or ``"error"``."""
    phrase = reason_phrase(status)
    return phrase.lower().replace(" ", "_").replace("-", "_").replace("'", "") if phrase else "error"
