"""A small client for ``push_server.py``: subscribe to a topic (reconnecting as an EventSource does), or publish to it.

    python examples/push_client.py --port 8080 subscribe --topic news --count 10
    python examples/push_client.py --port 8080 publish --topic news '{"headline": "hello"}' '{"n": 2}'

``subscribe`` prints every event as one JSON line ``{"id", "event", "data"}`` and, when the stream ends or the
connection drops, waits the server's ``retry`` delay and reconnects with ``Last-Event-ID``, so it resumes where it left
off. It stops after ``--count`` messages (or ``--timeout`` seconds) and prints a summary line:

    messages=10 gaps=0 resets=0 reconnects=1 pings=0 last_id=42

``publish`` posts each argument as a message and prints the server's answer. Python's own ``http.client`` underneath;
the stream is parsed by ``iokit.patterns.sse.EventStreamParser``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
import urllib.parse

from iokit.patterns.sse import EventStreamParser

DEFAULT_RETRY_MS = 2000
READ_SIZE = 65536
# The server pings a quiet stream every 15 s: a stream silent for this long is dead, and we reconnect.
SILENCE_LIMIT = 45.0


def subscribe(arguments) -> int:
    deadline = time.monotonic() + arguments.timeout
    parser = EventStreamParser(last_event_id=arguments.last_event_id or "")
    counts = {"messages": 0, "gaps": 0, "resets": 0, "reconnects": -1}
    path = "/events?" + urllib.parse.urlencode({"topic": arguments.topic})
    while counts["messages"] < arguments.count and time.monotonic() < deadline:
        counts["reconnects"] += 1
        headers = {"Accept": "text/event-stream"}
        if parser.last_event_id:
            headers["Last-Event-ID"] = parser.last_event_id
        silence_limit = max(0.05, min(SILENCE_LIMIT, deadline - time.monotonic()))
        connection = http.client.HTTPConnection(arguments.host, arguments.port, timeout=silence_limit)
        try:
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            if response.status != 200:
                print(f"GET {path} answered {response.status}: {response.read()[:200]!r}", file=sys.stderr)
                return 1
            _read_stream(response, parser, counts, arguments.count, deadline)
        except OSError as error:  # refused, reset, silent too long: wait and reconnect, as an EventSource does
            if time.monotonic() < deadline:
                print(f"connection lost: {error}", file=sys.stderr)
        finally:
            connection.close()
        if counts["messages"] < arguments.count:
            time.sleep(min((parser.retry or DEFAULT_RETRY_MS) / 1000, max(0.0, deadline - time.monotonic())))
    print(f"messages={counts['messages']} gaps={counts['gaps']} resets={counts['resets']} "
          f"reconnects={counts['reconnects']} pings={parser.comments} last_id={parser.last_event_id or '-'}")
    return 0 if counts["messages"] >= arguments.count else 1


def _read_stream(response, parser: EventStreamParser, counts: dict, wanted: int, deadline: float) -> None:
    """Print events from ``response`` until it ends, ``wanted`` messages have come, or ``deadline`` passes."""
    while counts["messages"] < wanted and time.monotonic() < deadline:
        data = response.read1(READ_SIZE)  # socket.timeout (an OSError) after the silence limit
        if not data:
            return
        for event in parser.feed(data):
            print(json.dumps({"id": event.id, "event": event.event, "data": event.data}), flush=True)
            if event.event == "message":
                counts["messages"] += 1
            elif event.event in ("gap", "reset"):
                counts[event.event + "s"] += 1


def publish(arguments) -> int:
    connection = http.client.HTTPConnection(arguments.host, arguments.port, timeout=30)
    path = f"/topics/{urllib.parse.quote(arguments.topic)}/messages"
    try:
        for message in arguments.messages:
            connection.request("POST", path, body=message.encode(), headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            body = response.read().decode(errors="replace").strip()
            print(body)
            if response.status != 202:
                return 1
    finally:
        connection.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="the server's address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="the server's port (default: 8000)")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("subscribe", help="print a topic's events")
    sub.add_argument("--topic", required=True)
    sub.add_argument("--count", type=int, default=sys.maxsize, help="stop after this many messages")
    sub.add_argument("--timeout", type=float, default=float("inf"), help="stop after this many seconds")
    sub.add_argument("--last-event-id", help="resume after this event id")
    pub = commands.add_parser("publish", help="post messages to a topic")
    pub.add_argument("--topic", required=True)
    pub.add_argument("messages", nargs="+", help="JSON messages")
    arguments = parser.parse_args(argv)
    try:
        return subscribe(arguments) if arguments.command == "subscribe" else publish(arguments)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
