"""Real asyncio programs on iokit.asyncio's loop, unchanged: uvicorn serving an ASGI app (its own process, started the
way its users start it, with ``--loop iokit.asyncio:new_event_loop``), and the httpx and aiohttp clients run
with ``iokit.asyncio.run``. The app reports the loop it runs on, so a silent fallback to asyncio's loop fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import iokit.asyncio
from iokit.asyncio import EngineTransport

from conftest import require_backend

LOOP_BACKENDS = ["epoll", "uring"]
TESTS_DIR = Path(__file__).resolve().parent


async def app(scope, receive, send) -> None:
    """``GET /loop``: the loop's class and backend; ``POST /sha256``: the body's digest; else 404."""
    if scope["type"] != "http":
        return
    if scope["path"] == "/loop":
        loop = asyncio.get_running_loop()
        body = f"{type(loop).__name__} {getattr(loop, 'backend_name', '-')}".encode()
    elif scope["path"] == "/sha256" and scope["method"] == "POST":
        digest, more = hashlib.sha256(), True
        while more:
            message = await receive()
            digest.update(message.get("body", b""))
            more = message.get("more_body", False)
        body = digest.hexdigest().encode()
    else:
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(params=LOOP_BACKENDS)
def uvicorn_server(request):
    """uvicorn on iokit's loop over the backend, in its own process; yields its base URL and the backend."""
    pytest.importorskip("uvicorn")
    require_backend(request.param)
    environment = {**os.environ, "IOKIT_BACKEND": request.param}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "test_asyncio_programs:app", "--app-dir", str(TESTS_DIR), "--host",
         "127.0.0.1", "--port", "0", "--loop", "iokit.asyncio:new_event_loop", "--http", "httptools",
         "--no-access-log", "--lifespan", "off"],
        env=environment, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        port = None
        lines = []
        while port is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            port = found and int(found.group(1))
        assert port, f"uvicorn did not start: {''.join(lines)}"
        yield f"http://127.0.0.1:{port}", request.param
    finally:
        process.terminate()
        try:
            # uvicorn shuts down gracefully, then raises the signal it caught again: it dies of SIGTERM.
            assert process.wait(10) in (0, -signal.SIGTERM)
            assert "Finished server process" in process.stderr.read()
        finally:
            process.kill()
            process.stderr.close()


def test_uvicorn_serves_on_the_loop(uvicorn_server):
    httpx = pytest.importorskip("httpx")
    url, backend = uvicorn_server
    with httpx.Client(base_url=url) as client:  # an outside client: plain threads and blocking sockets
        assert client.get("/loop").text == f"IokitEventLoop {backend}"
        body = os.urandom(3 * 1024 * 1024 + 5)
        response = client.post("/sha256", content=body)
        assert response.status_code == 200 and response.text == hashlib.sha256(body).hexdigest()
        assert client.get("/nothing").status_code == 404
        for _ in range(50):  # keep-alive: one connection, many requests
            assert client.get("/loop").status_code == 200


def test_httpx_async_client_on_the_loop(uvicorn_server):
    httpx = pytest.importorskip("httpx")
    url, backend = uvicorn_server

    async def main():
        async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=16)) as client:
            responses = await asyncio.gather(*(client.get("/loop") for _ in range(64)))
            assert {r.text for r in responses} == {f"IokitEventLoop {backend}"}
            body = os.urandom(1 << 20)
            response = await client.post("/sha256", content=body)
            assert response.text == hashlib.sha256(body).hexdigest()
            return asyncio.get_running_loop().backend_name
    assert iokit.asyncio.run(main(), backend=backend) == backend


def test_aiohttp_client_on_the_loop(uvicorn_server):
    aiohttp = pytest.importorskip("aiohttp")
    url, backend = uvicorn_server

    async def main():
        async with aiohttp.ClientSession(base_url=url) as session:
            async def get():
                async with session.get("/loop") as response:
                    return await response.text()
            texts = await asyncio.gather(*(get() for _ in range(32)))
            assert set(texts) == {f"IokitEventLoop {backend}"}
            # The pooled keep-alive connections are the engine's (asyncio's table of the loop's transports).
            pooled = list(asyncio.get_running_loop()._transports.values())
            assert pooled and all(isinstance(transport, EngineTransport) for transport in pooled)
            body = os.urandom(2 << 20)
            async with session.post("/sha256", data=body) as response:
                assert await response.text() == hashlib.sha256(body).hexdigest()
    iokit.asyncio.run(main(), backend=backend)
