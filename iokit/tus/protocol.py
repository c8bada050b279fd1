"""The tus 1.0.0 headers, parsed and checked without any I/O.

tus (https://tus.io/protocols/resumable-upload, version 1.0.0) moves an upload's state into a few headers: where the
client thinks the upload stands (``Upload-Offset``), how large it will be (``Upload-Length``), what it is
(``Upload-Metadata``: comma-separated ``key base64value`` pairs), a checksum of one chunk (``Upload-Checksum``), and
whether it is one part of a larger upload (``Upload-Concat: partial``) or the join of such parts
(``Upload-Concat: final;/files/a /files/b``). Every request but OPTIONS names the protocol version (``Tus-Resumable``).

Each parser here returns a plain value or raises ``HttpError`` with the status the protocol (or tusd, where the protocol
leaves it open) gives for that mistake, so that the HTTP handlers only decide *what to do*, and these rules can be
tested by feeding strings. Nothing here ever turns client text into a path: an upload id is accepted only if it has
the exact shape of the ids we make (128 random bits in lowercase hex), and even then it is only a key into the store's
table.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import email.utils
import hashlib
import re
import secrets
import urllib.parse

from ..http.client_input import read_integer
from ..http.errors import HttpError
from ..http.messages import Headers

TUS_VERSION = "1.0.0"
EXTENSIONS = ("creation", "termination", "checksum", "expiration", "concatenation")
CHECKSUM_ALGORITHMS = {"sha1": hashlib.sha1, "md5": hashlib.md5}
PATCH_CONTENT_TYPE = "application/offset+octet-stream"
COLLECTION_PATH = "/files"

# Statuses tus adds to HTTP's own (http.HTTPStatus knows 423 and 507, not 460).
CHECKSUM_MISMATCH = 460

_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
_METADATA_KEY = re.compile(r"[^\s,]+")
_UPLOAD_PATH = re.compile(re.escape(COLLECTION_PATH) + r"/([0-9a-f]{32})")


def new_upload_id() -> str:
    """Return a fresh upload id: 128 random bits as 32 lowercase hex digits."""
    return secrets.token_hex(16)


def is_upload_id(text: str) -> bool:
    """Return ``True`` if ``text`` has the exact shape of an id we hand out (any other shape is a 404)."""
    return _UPLOAD_ID.fullmatch(text) is not None


def upload_path(upload_id: str) -> str:
    """Return the URL path of an upload (what ``Location`` and ``Upload-Concat`` carry)."""
    return f"{COLLECTION_PATH}/{upload_id}"


def tus_error(status: int, error: str, detail: str, *, headers: tuple[tuple[str, str], ...] = (),
              close: bool = False) -> HttpError:
    """Return an ``HttpError`` carrying ``Tus-Resumable`` as every tus response must."""
    return HttpError(status, detail, error=error, headers=[("Tus-Resumable", TUS_VERSION), *headers], close=close)


def check_tus_resumable(value: str | None) -> None:
    """Raise 412 (with ``Tus-Version``) unless the request speaks tus 1.0.0; the request must then not be processed."""
    if value != TUS_VERSION:
        shown = "missing" if value is None else repr(value)
        raise tus_error(412, "unsupported_version", f"Tus-Resumable is {shown}; this server speaks {TUS_VERSION}",
                        headers=(("Tus-Version", TUS_VERSION),))


def check_patch_content_type(value: str | None) -> None:
    """Raise 415 unless the media type is ``application/offset+octet-stream`` (parameters are ignored)."""
    media_type = (value or "").split(";", 1)[0].strip().lower()
    if media_type != PATCH_CONTENT_TYPE:
        raise tus_error(415, "unsupported_media_type",
                        f"a PATCH body must be {PATCH_CONTENT_TYPE}, not {value or 'untyped'}")


def single_header(headers: Headers, name: str) -> str | None:
    """Return the one value of the header ``name`` (``None`` when absent); raise 400 when it is sent more than once,
    rather than let the first (or the last) win: two offsets or lengths are a client we cannot follow."""
    values = headers.get_all(name)
    if len(values) > 1:
        raise tus_error(400, f"repeated_{name.lower().replace('-', '_')}", f"{name} is sent {len(values)} times")
    return values[0] if values else None


def _non_negative_integer(name: str, value: str | None) -> int:
    number = read_integer(value)
    if number is None:
        shown = "missing" if value is None else repr(value[:40])
        raise tus_error(400, f"invalid_{name.lower().replace('-', '_')}",
                        f"{name} must be a non-negative integer, got {shown}")
    return number


def parse_upload_offset(value: str | None) -> int:
    """Return the ``Upload-Offset`` of a PATCH; raise 400 if it is missing or not a non-negative integer."""
    return _non_negative_integer("Upload-Offset", value)


def parse_upload_length(value: str | None, max_upload_bytes: int) -> int:
    """Return the ``Upload-Length`` of a creation; raise 400 if malformed, 413 above ``max_upload_bytes``."""
    length = _non_negative_integer("Upload-Length", value)
    if length > max_upload_bytes:
        raise tus_error(413, "upload_too_large", f"Upload-Length {length} is over this server's Tus-Max-Size "
                                                 f"of {max_upload_bytes}")
    return length


def parse_metadata(value: str | None, max_bytes: int) -> dict[str, bytes]:
    """Return the ``Upload-Metadata`` pairs as ``{key: decoded value}`` (an empty dict when the header is absent).

    Raises 400 for a header over ``max_bytes``, an empty pair, a key with spaces, a value that is not strict base64,
    or a repeated key: metadata we cannot parse is refused rather than stored half-understood.
    """
    if value is None or not value.strip():
        return {}
    if len(value) > max_bytes:
        raise tus_error(400, "invalid_metadata", f"Upload-Metadata is over {max_bytes} bytes")
    pairs: dict[str, bytes] = {}
    for item in value.split(","):
        key, _, encoded = item.strip().partition(" ")
        if not _METADATA_KEY.fullmatch(key):
            raise tus_error(400, "invalid_metadata", f"Upload-Metadata has an empty or malformed key in {item!r}")
        if key in pairs:
            raise tus_error(400, "invalid_metadata", f"Upload-Metadata repeats the key {key!r}")
        try:
            pairs[key] = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise tus_error(400, "invalid_metadata", f"the value of {key!r} in Upload-Metadata is not base64") from None
    return pairs


def encode_metadata(pairs: dict[str, bytes]) -> str:
    """Return the ``Upload-Metadata`` header value for ``pairs`` (keys in the order given)."""
    return ",".join(f"{key} {base64.b64encode(value).decode('ascii')}" if value else key
                    for key, value in pairs.items())


@dataclasses.dataclass(frozen=True)
class Checksum:
    """An ``Upload-Checksum``: the algorithm's name and the digest the client computed over its chunk."""

    algorithm: str
    digest: bytes

    def new_hasher(self):
        return CHECKSUM_ALGORITHMS[self.algorithm]()


def parse_checksum(value: str | None) -> Checksum | None:
    """Return the ``Upload-Checksum`` of a PATCH, ``None`` without one.

    Raises 400 for an algorithm other than sha1 or md5 (the protocol's answer to "unsupported"), a digest that is not
    base64, or one of the wrong length for its algorithm.
    """
    if value is None:
        return None
    algorithm, _, encoded = value.strip().partition(" ")
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise tus_error(400, "unsupported_checksum_algorithm",
                        f"Upload-Checksum uses {algorithm!r}; supported: {','.join(CHECKSUM_ALGORITHMS)}")
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise tus_error(400, "invalid_checksum", "the Upload-Checksum digest is not base64") from None
    expected_size = CHECKSUM_ALGORITHMS[algorithm]().digest_size
    if len(digest) != expected_size:
        raise tus_error(400, "invalid_checksum", f"a {algorithm} digest has {expected_size} bytes, not {len(digest)}")
    return Checksum(algorithm, digest)


@dataclasses.dataclass(frozen=True)
class Concat:
    """An ``Upload-Concat``: ``kind`` is ``"partial"`` or ``"final"``; ``part_ids`` lists a final's parts in order."""

    kind: str
    part_ids: tuple[str, ...] = ()

    def header_value(self) -> str:
        """Return the header as we echo it: our own paths, never the client's text."""
        if self.kind == "partial":
            return "partial"
        return "final;" + " ".join(upload_path(part) for part in self.part_ids)


def parse_concat(value: str | None) -> Concat | None:
    """Return the ``Upload-Concat`` of a creation, ``None`` without one.

    A final lists upload URLs, absolute or relative, separated by spaces; each must be one of ours
    (``/files/<id>``), else 400. Raises 400 for any other value, or a final with no part.
    """
    if value is None:
        return None
    value = value.strip()
    if value == "partial":
        return Concat("partial")
    kind, separator, urls = value.partition(";")
    if kind.strip() != "final" or not separator:
        raise tus_error(400, "invalid_concat", f"Upload-Concat must be 'partial' or 'final;<urls>', not {value!r}")
    part_ids = []
    for url in urls.split():
        try:
            path = urllib.parse.urlsplit(url).path
        except ValueError:  # e.g. "http://[x/files/..": urlsplit refuses a malformed IPv6 host
            path = ""
        found = _UPLOAD_PATH.fullmatch(path)
        if found is None:
            raise tus_error(400, "invalid_concat", f"{url!r} in Upload-Concat is not an upload of this server")
        part_ids.append(found[1])
    if not part_ids:
        raise tus_error(400, "invalid_concat", "a final Upload-Concat lists no partial upload")
    return Concat("final", tuple(part_ids))


def http_date(timestamp: float) -> str:
    """Return ``timestamp`` (seconds since the epoch) as an HTTP date, the format of ``Upload-Expires``."""
    return email.utils.formatdate(timestamp, usegmt=True)


def options_headers(max_upload_bytes: int) -> list[tuple[str, str]]:
    """Return the headers of the answer to ``OPTIONS /files``: what this server supports."""
    return [("Tus-Resumable", TUS_VERSION), ("Tus-Version", TUS_VERSION), ("Tus-Extension", ",".join(EXTENSIONS)),
            ("Tus-Max-Size", str(max_upload_bytes)), ("Tus-Checksum-Algorithm", ",".join(CHECKSUM_ALGORITHMS))]
