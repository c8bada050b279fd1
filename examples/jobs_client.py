"""A small client for ``jobs_server.py``: submits a job and follows it to its end by short or long polling.

    python examples/jobs_client.py --port 8080 --duration-ms 3000               # long polling (the default)
    python examples/jobs_client.py --port 8080 --duration-ms 3000 --mode short  # poll every Retry-After seconds
    python examples/jobs_client.py --port 8080 --duration-ms 60000 --cancel-after 1

It prints the job's monitor each time it changes (one JSON line), then a summary line:

    status=succeeded polls=3 changes=3 elapsed=3.01s mode=long

A short poll waits the ``Retry-After`` the server gave before asking again; a long poll sends the version it has (from
the ``ETag``) and is answered when the job moves on, so it costs one request per change instead of one per second. It
exits 0 once the job has ended (whatever its status), 1 on an unexpected answer. One keep-alive connection, Python's
own ``http.client``: it is a client of the HTTP API, not of iokit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time

TERMINAL = ("succeeded", "failed", "canceled")


class JobsClient:
    """Requests to one jobs server over one keep-alive connection (reopened if the server closed it)."""

    def __init__(self, host: str, port: int, timeout: float):
        self._connection = http.client.HTTPConnection(host, port, timeout=timeout)

    def request(self, method: str, path: str, body: dict | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict]:
        """Return (status, headers with lower-case names, decoded JSON body)."""
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", **(headers or {})} if payload is not None else (headers or {})
        for attempt in range(2):
            try:
                self._connection.request(method, path, body=payload, headers=headers)
                response = self._connection.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._connection.close()  # the server closed an idle keep-alive connection: one retry on a new one
                if attempt:
                    raise
        return response.status, {name.lower(): value for name, value in response.getheaders()}, json.loads(data)

    def close(self) -> None:
        self._connection.close()


def follow(client: JobsClient, location: str, monitor: dict, headers: dict, arguments, report) -> tuple[dict, int]:
    """Poll ``location`` until the job ends; call ``report(monitor)`` on each change. Return (monitor, polls)."""
    polls = 0
    cancel_at = None if arguments.cancel_after is None else time.monotonic() + arguments.cancel_after
    while monitor["status"] not in TERMINAL:
        if cancel_at is not None and time.monotonic() >= cancel_at:
            status, _, monitor = client.request("POST", location + "/cancel")
            if status not in (202, 409):
                raise RuntimeError(f"cancel answered {status}: {monitor}")
            cancel_at = None
            report(monitor)
            continue
        if arguments.mode == "short":
            time.sleep(float(headers.get("retry-after", "1")))
            path = location
        else:
            version = headers.get("etag", '"0"').strip('"')
            wait = arguments.wait if cancel_at is None else min(arguments.wait, max(0.0, cancel_at - time.monotonic()))
            path = f"{location}?wait={wait:g}&version={version}"
        status, headers, latest = client.request("GET", path)
        polls += 1
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {latest}")
        if latest["version"] != monitor["version"]:
            report(latest)
        monitor = latest
    return monitor, polls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="the server's address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="the server's port (default: 8000)")
    parser.add_argument("--duration-ms", type=int, default=2000, help="how long the job runs (default: 2000)")
    parser.add_argument("--fail", action="store_true", help="ask for a job that fails")
    parser.add_argument("--mode", choices=["short", "long"], default="long", help="how to poll (default: long)")
    parser.add_argument("--wait", type=float, default=30.0, help="seconds a long poll may be held (default: 30)")
    parser.add_argument("--idempotency-key", help="send this Idempotency-Key with the POST")
    parser.add_argument("--cancel-after", type=float, help="cancel the job after this many seconds")
    arguments = parser.parse_args(argv)

    client = JobsClient(arguments.host, arguments.port, timeout=arguments.wait + 30)
    started = time.monotonic()
    changes = 0

    def report(monitor: dict) -> None:
        nonlocal changes
        changes += 1
        print(json.dumps(monitor, separators=(",", ":")), flush=True)

    try:
        headers = {"Idempotency-Key": arguments.idempotency_key} if arguments.idempotency_key else {}
        status, response_headers, monitor = client.request(
            "POST", "/jobs", {"duration_ms": arguments.duration_ms, "fail": arguments.fail}, headers)
        if status != 202:
            print(f"POST /jobs answered {status}: {monitor}", file=sys.stderr)
            return 1
        report(monitor)
        monitor, polls = follow(client, response_headers["location"], monitor, response_headers, arguments, report)
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        client.close()
    print(f"status={monitor['status']} polls={polls} changes={changes} elapsed={time.monotonic() - started:.2f}s "
          f"mode={arguments.mode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
