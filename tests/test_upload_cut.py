"""tus after a cut connection: a HEAD while the cut-off chunk is being committed must not report the offset before it.

A client dies mid-PATCH; in sync mode the server then writes, fdatasyncs and records the bytes that arrived (about
20 ms). A HEAD in that window answered Upload-Offset: 0, then the real offset: a client resuming from the 0 would get
409 or, worse, believe its bytes lost. Now it is 423 (retry; tus clients do) until the commit is done, then the real
offset, and never anything else. Real server processes, a raw socket for the dying client, http.client for the HEADs.
"""

from __future__ import annotations

import http.client
import socket
import tempfile
import time

import pytest

from example_servers import EXAMPLES, ServerProcess, backend_name  # noqa: F401

TUS = {"Tus-Resumable": "1.0.0"}
LENGTH, SENT = 8 * 1024 * 1024, 3 * 1024 * 1024


@pytest.fixture(scope="module")
def server(backend_name):
    with tempfile.TemporaryDirectory(dir=".") as directory:  # on the disk, where fdatasync costs what it costs
        with ServerProcess(EXAMPLES / "upload_server.py", backend_name, "--dir", directory,
                           "--durability", "sync") as process:
            yield process


def create(server) -> str:
    connection = http.client.HTTPConnection(*server.address, timeout=10)
    connection.request("POST", "/files", headers={**TUS, "Upload-Length": str(LENGTH)})
    response = connection.getresponse()
    response.read()
    assert response.status == 201
    connection.close()
    return response.getheader("Location")


def test_a_head_during_the_commit_of_a_cut_chunk_never_reports_an_offset_about_to_change(server):
    for attempt in range(3):
        location = create(server)
        dying = socket.create_connection(server.address, timeout=10)
        dying.sendall((f"PATCH {location} HTTP/1.1\r\nHost: t\r\nTus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\n"
                       f"Content-Type: application/offset+octet-stream\r\nContent-Length: {LENGTH}\r\n\r\n").encode())
        dying.sendall(b"x" * SENT)
        time.sleep(0.3)  # the server has received them
        heads = http.client.HTTPConnection(*server.address, timeout=10)
        dying.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST: dead
        dying.close()
        seen = []
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            heads.request("HEAD", location, headers=TUS)
            response = heads.getresponse()
            response.read()
            seen.append(423 if response.status == 423 else int(response.getheader("Upload-Offset")))
            if seen[-1] == SENT:
                break
        heads.close()
        assert seen[-1] == SENT, seen
        assert set(seen) <= {423, SENT}, f"attempt {attempt}: HEAD answered {seen}"
