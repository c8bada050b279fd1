"""The request/response pattern over a small binary protocol (framing and ops: ``binproto.py`` beside this file).

Per connection, a reader task decodes frames and turns each into a reply due at some time (now for PING and ECHO, now
plus the delay for SLEEP); a writer task sends the replies in request order, each when it is due. So SLEEPs on one
connection overlap (ten 300 ms sleeps take 300 ms, not 3 s) while replies stay in order, and no task or thread is spent
per request on any backend.

At most ``max_in_flight`` (64) requests may be read and not yet answered: the reader takes a token from a bounded queue
before it reads on, and the writer gives it back after the reply is sent. At the limit the reader stops reading, the
kernel's buffers fill, and TCP slows the client down (backpressure).

Run: ``python examples/binproto_server.py --backend uring --port 9000``; try it with ``binproto_client.py``.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import iokit
from iokit import serve

from binproto import (BinprotoLimits, ErrorCode, Frame, FrameDecoder, FrameError, Op, encode_frame, error_frame,
                      parse_sleep)


@dataclasses.dataclass(frozen=True)
class _Reply:
    data: bytes
    due: float = 0.0             # iokit.current_time() at which it may be sent
    answers_request: bool = True  # gives back an in-flight token once sent
    close_after: bool = False


_END = _Reply(b"", answers_request=False)
_BATCH_BYTES = 256 * 1024


class BinprotoServer:
    """The binary protocol service for ``iokit.serve.main``."""

    def __init__(self, limits: BinprotoLimits = BinprotoLimits()):
        self.limits = limits
        self.max_connections = limits.max_connections

    async def handle_connection(self, stream, shutdown: serve.Shutdown) -> None:
        """Serve one connection until the client closes, a fatal framing error, or the server stops."""
        # Room for every request in flight, plus a fatal error reply and the end marker: put() never blocks on it.
        replies = iokit.Queue(self.limits.max_in_flight + 2)
        in_flight = iokit.Queue(self.limits.max_in_flight)
        async with iokit.TaskGroup() as tasks:
            tasks.spawn(self._write_replies, stream, replies, in_flight, name="binproto-writer")
            try:
                await self._read_requests(stream, replies, in_flight, shutdown)
            finally:
                replies.put_nowait(_END)
        await serve.close_gracefully(stream, 1.0)

    async def reject_connection(self, stream) -> None:
        """Tell a client over the connection limit so, then close."""
        message = f"the server is at its limit of {self.max_connections} connections"
        with iokit.move_on_after(self.limits.send_timeout):
            await stream.sendall(encode_frame(error_frame(0, ErrorCode.SERVER_BUSY, message)))
        await serve.close_gracefully(stream, 0.5)

    async def _read_requests(self, stream, replies, in_flight, shutdown: serve.Shutdown) -> None:
        decoder = FrameDecoder(self.limits.max_frame_bytes)
        frame_started_at = None
        while True:
            try:
                frame = decoder.next_frame()
            except FrameError as error:
                await replies.put(_Reply(encode_frame(error_frame(error.request_id, error.code, error.message)),
                                         answers_request=False, close_after=True))
                return
            if frame is not None:
                frame_started_at = None
                await in_flight.put(None)  # blocks while max_in_flight requests await their replies: backpressure
                await replies.put(self._answer(frame))
                continue
            if decoder.frame_in_progress:
                # The frame timeout runs only while we wait for the client, never while we hold back (backpressure).
                now = iokit.current_time()
                frame_started_at = frame_started_at or now
                data = None
                with iokit.move_on_after(frame_started_at + self.limits.frame_timeout - now):
                    data = await _receive(stream, self.limits.receive_size)
                if data is None:
                    message = f"a frame was left unfinished for {self.limits.frame_timeout} s"
                    await replies.put(_Reply(encode_frame(error_frame(0, ErrorCode.FRAME_TIMEOUT, message)),
                                             answers_request=False, close_after=True))
                    return
            else:
                data = None
                with shutdown.interruptible(self.limits.idle_timeout or math.inf):
                    data = await _receive(stream, self.limits.receive_size)
                if data is None:
                    return  # stopping, or idle too long: replies already owed are still sent
            if not data:
                return
            decoder.feed(data)

    def _answer(self, frame: Frame) -> _Reply:
        if frame.op == Op.PING:
            return _Reply(encode_frame(Frame(Op.PING, frame.request_id)))
        if frame.op == Op.ECHO:
            return _Reply(encode_frame(Frame(Op.ECHO, frame.request_id, frame.payload)))
        if frame.op == Op.SLEEP:
            try:
                milliseconds = parse_sleep(frame.payload, self.limits)
            except ValueError as error:
                return _Reply(encode_frame(error_frame(frame.request_id, ErrorCode.BAD_ARGUMENT, str(error))))
            return _Reply(encode_frame(Frame(Op.SLEEP, frame.request_id)),
                          due=iokit.current_time() + milliseconds / 1000)
        return _Reply(encode_frame(error_frame(frame.request_id, ErrorCode.UNKNOWN_OP, f"unknown op {frame.op}")))

    async def _write_replies(self, stream, replies, in_flight) -> None:
        held = None  # a reply taken from the queue while batching but not due yet
        while True:
            reply, held = held or await replies.get(), None
            if reply is _END:
                return
            delay = reply.due - iokit.current_time()
            if delay > 0:
                await iokit.sleep(delay)
            # Replies already due go out with it in one write: one syscall for a pipelined burst of PINGs.
            batch, size = [reply], len(reply.data)
            while not batch[-1].close_after and size < _BATCH_BYTES:
                try:
                    following = replies.get_nowait()
                except iokit.WouldBlock:
                    break
                if following is _END or following.due > iokit.current_time():
                    held = following
                    break
                batch.append(following)
                size += len(following.data)
            with iokit.move_on_after(self.limits.send_timeout) as scope:
                await stream.sendall(b"".join(item.data for item in batch))
            if scope.cancelled_caught:
                raise ConnectionAbortedError(f"a reply made no progress for {self.limits.send_timeout} s")
            for item in batch:
                if item.answers_request:
                    in_flight.get_nowait()
            if batch[-1].close_after:
                return


async def _receive(stream, size: int) -> bytes:
    try:
        return await stream.receive_some(size)
    except (ConnectionResetError, ConnectionAbortedError):
        return b""


def main(argv: list[str] | None = None) -> int:
    parser = serve.argument_parser(__doc__.splitlines()[0])
    serve.add_limit_arguments(parser, BinprotoLimits)
    return serve.main(lambda arguments: BinprotoServer(serve.limits_from_arguments(arguments, BinprotoLimits)),
                      parser, argv)


if __name__ == "__main__":
    sys.exit(main())
