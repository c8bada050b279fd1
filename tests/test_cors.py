"""--cors-origin on every HTTP example server, seen by curl: the preflight, the headers exposed, Vary: Origin, and
nothing at all for an origin not listed or a server with no list. (tests/test_browser.py checks the same from a real
page on another origin, in Chromium.)"""

from __future__ import annotations

import subprocess
import tempfile

import pytest

from example_servers import EXAMPLES, ServerProcess
from iokit.http.cors import CorsPolicy, parse_origin

ALLOWED, OTHER = "http://app.example:3000", "http://evil.example"
# (server, a route, extra flags): the upload server needs a folder of its own.
SERVERS = [("http_server.py", "/"), ("upload_server.py", "/files"), ("jobs_server.py", "/stats"),
           ("push_server.py", "/stats")]
MUST_EXPOSE = ("Location", "Upload-Offset", "Upload-Length", "Tus-Resumable", "Tus-Version", "Tus-Max-Size",
               "Tus-Extension", "Upload-Expires", "ETag", "Retry-After")


def curl_head(url: str, *options: str) -> tuple[int, dict[str, str]]:
    done = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-D", "-", "--max-time", "10", *options, url],
                          capture_output=True, text=True, timeout=30)
    lines = done.stdout.strip().splitlines()  # text mode: the CRLFs are newlines already
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(": ")
        fields[name.lower()] = f"{fields[name.lower()]}, {value}" if name.lower() in fields else value
    return int(lines[0].split()[1]), fields


@pytest.fixture(params=SERVERS, ids=[script for script, _ in SERVERS])
def server(request):
    script, path = request.param
    with tempfile.TemporaryDirectory() as directory:
        flags = ["--dir", directory] if script == "upload_server.py" else []
        with ServerProcess(EXAMPLES / script, "epoll", *flags, "--cors-origin", ALLOWED,
                           "--cors-origin", "http://second.example") as process:
            yield process, path


def test_a_preflight_from_a_listed_origin_is_answered(server):
    process, path = server
    status, fields = curl_head(process.url + path, "-X", "OPTIONS", "-H", f"Origin: {ALLOWED}",
                               "-H", "Access-Control-Request-Method: PATCH",
                               "-H", "Access-Control-Request-Headers: tus-resumable, upload-offset, content-type")
    assert status == 204, fields
    assert fields["access-control-allow-origin"] == ALLOWED and fields["vary"] == "Origin"
    assert "PATCH" in fields["access-control-allow-methods"]
    allowed_headers = fields["access-control-allow-headers"].lower()
    assert all(name in allowed_headers for name in ("tus-resumable", "upload-offset", "content-type",
                                                     "last-event-id", "if-none-match"))


def test_a_response_to_a_listed_origin_exposes_the_tus_and_polling_headers(server):
    process, path = server
    status, fields = curl_head(process.url + path, "-H", f"Origin: {ALLOWED}", "-H", "Tus-Resumable: 1.0.0")
    assert fields["access-control-allow-origin"] == ALLOWED and "Origin" in fields["vary"]
    exposed = [name.strip() for name in fields["access-control-expose-headers"].split(",")]
    assert all(name in exposed for name in MUST_EXPOSE), exposed


def test_an_origin_not_listed_gets_no_cors_headers(server):
    process, path = server
    for options in (["-H", f"Origin: {OTHER}"],
                    ["-X", "OPTIONS", "-H", f"Origin: {OTHER}", "-H", "Access-Control-Request-Method: POST"]):
        status, fields = curl_head(process.url + path, *options)
        assert not [name for name in fields if name.startswith("access-control-")], fields
        assert fields["vary"] == "Origin"  # the answer depends on the Origin: caches must know


@pytest.mark.parametrize("script", [script for script, _ in SERVERS])
def test_without_the_flag_no_cors_at_all(script):
    with tempfile.TemporaryDirectory() as directory:
        flags = ["--dir", directory] if script == "upload_server.py" else []
        with ServerProcess(EXAMPLES / script, "epoll", *flags) as process:
            status, fields = curl_head(process.url + "/", "-X", "OPTIONS", "-H", f"Origin: {ALLOWED}",
                                       "-H", "Access-Control-Request-Method: GET")
            assert status in (404, 405) and not [name for name in fields if name.startswith("access-control-")]


def test_origins_are_read_as_browsers_send_them():
    assert parse_origin("HTTP://App.Example:80/") == "http://app.example"
    assert parse_origin("https://x.example:8443") == "https://x.example:8443"
    assert parse_origin("http://[::1]:9000") == "http://[::1]:9000" and parse_origin("*") == "*"
    for bad in ("app.example", "ftp://x", "http://x/path", "http://x:99999", "http://user@x"):
        with pytest.raises(ValueError):
            parse_origin(bad)
    assert CorsPolicy(["*"]).allows("http://anything.example") and not CorsPolicy([ALLOWED]).allows(OTHER)
