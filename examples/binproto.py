"""The binary request/response protocol of the examples: framing, ops and limits, sans-IO (the server and client share it).

A frame is ``u32be length`` followed by ``length`` bytes: an 8-byte header ``u8 version (1), u8 op, u16be flags,
u32be request_id`` and the payload. So ``length`` counts the header and the payload, and is at least 8.

Ops: PING (empty payload, empty reply), ECHO (the reply carries the payload back), SLEEP (payload ``u32be ms``, at most
10000; the reply comes after that long). A reply has the request's op and request id, and replies leave in request order.
ERROR (op 0xFF, payload ``u16be code`` + UTF-8 message) answers a request we cannot serve; for an unknown op or a bad
argument the connection stays open, for a bad version, an oversized or undersized length, or a frame unfinished after
10 s the server sends ERROR and closes (the stream can no longer be trusted to be in step).

The decoder checks a frame's length and version as soon as their bytes arrive, so a bad stream is refused without
waiting for (or buffering) a megabyte of payload that will never be used.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

VERSION = 1
LENGTH = struct.Struct(">I")
HEADER = struct.Struct(">BBHI")          # version, op, flags, request_id
HEADER_SIZE = HEADER.size                # 8: the smallest valid length
ERROR_CODE = struct.Struct(">H")
SLEEP_ARGUMENT = struct.Struct(">I")
MIB = 1024 * 1024


class Op(enum.IntEnum):
    PING = 1
    ECHO = 2
    SLEEP = 3
    ERROR = 0xFF


class ErrorCode(enum.IntEnum):
    UNKNOWN_OP = 1
    BAD_ARGUMENT = 2         # a SLEEP without a 4-byte payload, or over the limit
    BAD_VERSION = 3          # fatal
    BAD_LENGTH = 4           # fatal: over the frame limit, or shorter than a header
    FRAME_TIMEOUT = 5        # fatal: a frame started and did not finish in time
    SERVER_BUSY = 6          # fatal: the server is at its connection limit


@dataclasses.dataclass(frozen=True)
class BinprotoLimits:
    """Every bound of the binary server, in one place. Sizes in bytes, times in seconds."""

    max_frame_bytes: int = 1 * MIB       # the largest ``length`` accepted
    frame_timeout: float = 10.0          # from the first byte of a frame to its last
    max_in_flight: int = 64              # requests read and not yet answered, per connection; past it we stop reading
    max_sleep_ms: int = 10_000
    max_connections: int = 1024
    idle_timeout: float | None = None    # a connection with nothing in flight and no frame started; None: wait forever
    send_timeout: float = 10.0           # a reply write that makes no progress for this long ends the connection
    receive_size: int = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Frame:
    """One decoded frame. ``payload`` is ``bytes``."""

    op: int
    request_id: int
    payload: bytes = b""
    flags: int = 0
    version: int = VERSION


class FrameError(Exception):
    """The byte stream broke the framing rules; ``code`` is the ``ErrorCode`` to send before closing.

    ``request_id`` is the id of the offending frame when its header had arrived, else 0.
    """

    def __init__(self, code: ErrorCode, message: str, request_id: int = 0):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def encode_frame(frame: Frame) -> bytes:
    """Return the bytes of ``frame``. Raises ``struct.error`` for a field out of range."""
    return (LENGTH.pack(HEADER_SIZE + len(frame.payload))
            + HEADER.pack(frame.version, frame.op, frame.flags, frame.request_id) + frame.payload)


def error_frame(request_id: int, code: ErrorCode, message: str) -> Frame:
    """Return the ERROR frame for ``request_id`` with ``code`` and a UTF-8 ``message``."""
    return Frame(Op.ERROR, request_id, ERROR_CODE.pack(code) + message.encode())


def parse_error(payload: bytes) -> tuple[int, str]:
    """Return ``(code, message)`` from an ERROR payload. Raises ``ValueError`` for a payload shorter than a code."""
    if len(payload) < ERROR_CODE.size:
        raise ValueError("an ERROR payload starts with a 2-byte code")
    return ERROR_CODE.unpack_from(payload)[0], payload[ERROR_CODE.size:].decode(errors="replace")


def sleep_frame(request_id: int, milliseconds: int) -> Frame:
    """Return a SLEEP request for ``milliseconds``."""
    return Frame(Op.SLEEP, request_id, SLEEP_ARGUMENT.pack(milliseconds))


def parse_sleep(payload: bytes, limits: BinprotoLimits) -> int:
    """Return the milliseconds of a SLEEP payload. Raises ``ValueError`` (answered BAD_ARGUMENT) when it is malformed."""
    if len(payload) != SLEEP_ARGUMENT.size:
        raise ValueError(f"SLEEP takes a 4-byte millisecond count, not {len(payload)} bytes")
    milliseconds = SLEEP_ARGUMENT.unpack(payload)[0]
    if milliseconds > limits.max_sleep_ms:
        raise ValueError(f"SLEEP of {milliseconds} ms is over the limit of {limits.max_sleep_ms} ms")
    return milliseconds


class FrameDecoder:
    """Cuts a byte stream into ``Frame`` objects. ``feed`` bytes, then call ``next_frame`` until it returns ``None``.

    ``next_frame`` raises ``FrameError`` for a fatal framing error; after that the decoder is of no further use.
    ``max_frame_bytes`` bounds ``length``.
    """

    def __init__(self, max_frame_bytes: int = 1 * MIB):
        self._max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        """Append ``data`` to the bytes waiting to be decoded."""
        self._buffer += data

    @property
    def frame_in_progress(self) -> bool:
        """``True`` while some bytes of a frame have arrived but not all of it (the frame timeout runs)."""
        return bool(self._buffer)

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or ``None`` if it has not all arrived. Raises ``FrameError``."""
        buffer = self._buffer
        if len(buffer) < LENGTH.size:
            return None
        (length,) = LENGTH.unpack_from(buffer)
        if length > self._max_frame_bytes:
            raise FrameError(ErrorCode.BAD_LENGTH, f"frame length {length} is over {self._max_frame_bytes}")
        if length < HEADER_SIZE:
            raise FrameError(ErrorCode.BAD_LENGTH, f"frame length {length} is shorter than the {HEADER_SIZE}-byte header")
        if len(buffer) > LENGTH.size and buffer[LENGTH.size] != VERSION:
            request_id = HEADER.unpack_from(buffer, LENGTH.size)[3] if len(buffer) >= LENGTH.size + HEADER_SIZE else 0
            raise FrameError(ErrorCode.BAD_VERSION, f"protocol version {buffer[LENGTH.size]} (this is {VERSION})",
                             request_id)
        end = LENGTH.size + length
        if len(buffer) < end:
            return None
        version, op, flags, request_id = HEADER.unpack_from(buffer, LENGTH.size)
        payload = bytes(buffer[LENGTH.size + HEADER_SIZE:end])
        del buffer[:end]
        return Frame(op, request_id, payload, flags, version)
