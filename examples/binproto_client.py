"""A small client for ``binproto_server.py``: sends requests over several connections and checks every reply.

Each connection sends its requests in pipelined windows (``--pipeline`` frames, then their replies) and checks that every
reply carries the request's id and op, in order, and that ECHO brings back the same payload. It prints one summary line:

    replies=1000 errors=0 connections=4 elapsed=0.21s rate=4762/s window_p50_us=... window_p99_us=...

and exits 1 if any reply was wrong or missing. It runs on the iokit runtime too (``--backend``).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import iokit

from binproto import Frame, FrameDecoder, Op, encode_frame, parse_error, sleep_frame

MAX_REPLY_BYTES = 2 * 1024 * 1024


def build_requests(count: int, op: str, payload_size: int, sleep_ms: int, first_id: int) -> list[Frame]:
    """Return ``count`` request frames with ids from ``first_id``; ``op`` is ping, echo, sleep or mix (all three)."""
    kinds = itertools.cycle(["ping", "echo", "sleep"] if op == "mix" else [op])
    frames = []
    for request_id, kind in zip(range(first_id, first_id + count), kinds):
        if kind == "ping":
            frames.append(Frame(Op.PING, request_id))
        elif kind == "echo":
            frames.append(Frame(Op.ECHO, request_id, bytes([request_id % 251]) * payload_size))
        else:
            frames.append(sleep_frame(request_id, sleep_ms))
    return frames


def check_reply(request: Frame, reply: Frame) -> str | None:
    """Return what is wrong with ``reply`` to ``request``, or ``None`` if it is right."""
    if reply.request_id != request.request_id:
        return f"reply id {reply.request_id} for request {request.request_id}: out of order"
    if reply.op == Op.ERROR:
        code, message = parse_error(reply.payload)
        return f"request {request.request_id}: ERROR {code} {message}"
    if reply.op != request.op:
        return f"request {request.request_id}: reply op {reply.op}, expected {request.op}"
    if request.op == Op.ECHO and reply.payload != request.payload:
        return f"request {request.request_id}: echo payload differs"
    return None


async def run_connection(arguments, requests: list[Frame], summary: dict) -> None:
    stream = await iokit.connect_tcp(arguments.host, arguments.port)
    decoder = FrameDecoder(MAX_REPLY_BYTES)
    try:
        for start in range(0, len(requests), arguments.pipeline):
            window = requests[start:start + arguments.pipeline]
            started = iokit.current_time()
            await stream.sendall(b"".join(encode_frame(frame) for frame in window))
            for request in window:
                reply = await _next_reply(stream, decoder)
                if reply is None:
                    summary["errors"].append("the server closed the connection")
                    return
                problem = check_reply(request, reply)
                if problem:
                    summary["errors"].append(problem)
                else:
                    summary["replies"] += 1
            summary["window_us"].append((iokit.current_time() - started) * 1e6)
    finally:
        await stream.aclose()


async def _next_reply(stream, decoder: FrameDecoder) -> Frame | None:
    while (frame := decoder.next_frame()) is None:
        data = await stream.receive_some(65536)
        if not data:
            return None
        decoder.feed(data)
    return frame


async def run(arguments) -> int:
    summary = {"replies": 0, "errors": [], "window_us": []}
    per_connection = -(-arguments.requests // arguments.connections)
    started = iokit.current_time()
    async with iokit.TaskGroup() as tasks:
        for index in range(arguments.connections):
            first = index * per_connection
            count = max(0, min(per_connection, arguments.requests - first))
            requests = build_requests(count, arguments.op, arguments.payload_size, arguments.sleep_ms, first)
            tasks.spawn(run_connection, arguments, requests, summary)
    elapsed = iokit.current_time() - started
    windows = sorted(summary["window_us"]) or [0.0]
    p99 = windows[min(len(windows) - 1, int(len(windows) * 0.99))]
    print(f"replies={summary['replies']} errors={len(summary['errors'])} connections={arguments.connections} "
          f"elapsed={elapsed:.2f}s rate={summary['replies'] / max(elapsed, 1e-9):.0f}/s "
          f"window_p50_us={statistics.median(windows):.0f} window_p99_us={p99:.0f}", flush=True)
    for problem in summary["errors"][:10]:
        print(f"error: {problem}", file=sys.stderr)
    return 0 if not summary["errors"] and summary["replies"] == arguments.requests else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--requests", type=int, default=1000, help="in total, over all connections")
    parser.add_argument("--pipeline", type=int, default=16, help="requests sent before reading their replies")
    parser.add_argument("--op", choices=["ping", "echo", "sleep", "mix"], default="mix")
    parser.add_argument("--payload-size", type=int, default=64)
    parser.add_argument("--sleep-ms", type=int, default=1)
    arguments = parser.parse_args(argv)
    return iokit.run(run, arguments, backend=arguments.backend)


if __name__ == "__main__":
    sys.exit(main())
