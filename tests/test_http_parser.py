"""The sans-IO parts of the HTTP core: the request parser, response framing, routing and limits. No sockets, fast.

The parser is checked three ways: against each rule of PATTERNS.md section 1 (one case per limit and smuggling shape),
against h11 as an independent reference parser on random valid request sequences, and for independence from how the
byte stream is split into reads (any split must give the same events, and the same error for a bad stream).
"""

from __future__ import annotations

import json

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iokit.http.errors import BodyIncomplete, HttpError
from iokit.http.status import error_code
from iokit.http.limits import DEFAULT_LIMITS, HttpLimits
from iokit.http.messages import END_OF_MESSAGE, BodyChunk, Headers, RequestHead
from iokit.http.parser import RequestParser
from iokit.http.response import (LAST_CHUNK, BodyFraming, Response, encode_chunk, frame_response)
from iokit.http.routing import App


def parse(data: bytes | list[bytes], limits: HttpLimits = DEFAULT_LIMITS) -> list:
    """Feed ``data`` (one read, or a list of reads) and return every event, body chunks merged per message."""
    parser = RequestParser(limits)
    events: list = []
    for piece in [data] if isinstance(data, bytes) else data:
        parser.feed(piece)
        while (event := parser.next_event()) is not None:
            if isinstance(event, BodyChunk) and events and isinstance(events[-1], BodyChunk):
                events[-1] = BodyChunk(events[-1].data + event.data)
            else:
                events.append(event)
    return events


def only_error(data: bytes | list[bytes], limits: HttpLimits = DEFAULT_LIMITS) -> HttpError:
    events = parse(data, limits)
    assert events and isinstance(events[-1], HttpError), events
    assert events[-1].close
    return events[-1]


def request(method="GET", target="/", headers=(("Host", "example"),), body=b"", version="1.1") -> bytes:
    lines = [f"{method} {target} HTTP/{version}"] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- well-formed requests ---------------------------------------------------------------------------------------------

def test_simple_get_gives_a_head_and_an_end():
    head, end = parse(request(headers=[("Host", "a"), ("X-Thing", "  padded value \t")]))
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.version, head.keep_alive) == ("GET", "/", "1.1", True)
    assert head.headers.get("x-thing") == "padded value"
    assert head.headers.get("HOST") == "a" and "host" in head.headers
    assert not head.has_body and head.content_length is None and not head.chunked
    assert end is END_OF_MESSAGE


def test_content_length_body():
    head, body, end = parse(request("POST", "/echo", [("Host", "a"), ("Content-Length", "5")], b"hello"))
    assert head.content_length == 5 and head.has_body
    assert body == BodyChunk(b"hello") and end is END_OF_MESSAGE


def test_chunked_body_with_extensions_and_trailers():
    data = request("POST", "/echo", [("Host", "a"), ("Transfer-Encoding", "chunked")],
                   b"3;name=value\r\nabc\r\n2\r\nde\r\n0\r\nChecksum: x\r\n\r\n")
    head, body, end = parse(data)
    assert head.chunked and head.content_length is None
    assert body == BodyChunk(b"abcde") and end is END_OF_MESSAGE


def test_pipelined_requests_come_out_in_order():
    data = request(target="/a") + request("POST", "/b", [("Host", "a"), ("Content-Length", "2")], b"xy") + \
        request(target="/c")
    events = parse(data)
    assert [e.target for e in events if isinstance(e, RequestHead)] == ["/a", "/b", "/c"]
    assert events.count(END_OF_MESSAGE) == 3 and BodyChunk(b"xy") in events


@pytest.mark.parametrize("version, connection, keep_alive", [
    ("1.1", None, True), ("1.1", "close", False), ("1.0", None, False), ("1.0", "keep-alive", True),
    ("1.1", "Keep-Alive, Close", False),
])
def test_keep_alive_follows_version_and_connection(version, connection, keep_alive):
    headers = [("Host", "a")] + ([("Connection", connection)] if connection else [])
    assert parse(request(headers=headers, version=version))[0].keep_alive is keep_alive


def test_http10_needs_no_host():
    assert isinstance(parse(request(headers=[], version="1.0"))[0], RequestHead)


def test_expect_100_continue_is_reported():
    head = parse(request("POST", "/", [("Host", "a"), ("Content-Length", "1"), ("Expect", "100-Continue")]))[0]
    assert head.expect_continue


def test_upgrade_is_ignored_and_the_next_request_still_parsed():
    first = request(headers=[("Host", "a"), ("Connection", "Upgrade"), ("Upgrade", "websocket")])
    events = parse(first + request(target="/next"))
    assert [e.target for e in events if isinstance(e, RequestHead)] == ["/", "/next"]


def test_connect_is_never_kept_alive():
    assert parse(b"CONNECT example:443 HTTP/1.1\r\nHost: example:443\r\n\r\n")[0].keep_alive is False


def test_a_known_but_unrouted_method_parses():
    # PROPFIND is HTTP (WebDAV); the router, not the parser, answers 405 with the route's Allow list.
    assert parse(request("PROPFIND"))[0].method == "PROPFIND"


# -- limits -----------------------------------------------------------------------------------------------------------

def test_default_limits_are_the_documented_ones():
    limits = HttpLimits()
    assert limits.max_request_line_bytes == 8192
    assert (limits.max_header_bytes, limits.max_header_fields) == (16384, 100)
    assert limits.max_body_bytes == 1024 * 1024
    assert (limits.header_timeout, limits.idle_timeout) == (10.0, 15.0)
    assert limits.max_connections == 1024


def test_limits_refuse_nonsense():
    with pytest.raises(ValueError):
        HttpLimits(header_timeout=0)


def test_request_line_at_the_limit_passes_and_one_byte_more_is_414():
    overhead = len("GET  HTTP/1.1\r\n")
    target = "/" + "a" * (8192 - overhead - 1)
    assert isinstance(parse(request(target=target))[0], RequestHead)
    assert only_error(request(target=target + "a")).status == 414


def test_a_long_request_line_is_refused_before_it_ends():
    # The target arrives in pieces; 414 must come without waiting for a line end that may never be sent.
    error = only_error([b"GET /"] + [b"a" * 1000] * 10)
    assert error.status == 414


def test_header_bytes_over_the_limit_is_431():
    headers = [("Host", "a")] + [(f"X-{i}", "v" * 1000) for i in range(17)]
    assert only_error(request(headers=headers)).status == 431


def test_more_than_100_fields_is_431_and_100_pass():
    fields = [("Host", "a")] + [(f"X-{i}", "v") for i in range(99)]
    assert isinstance(parse(request(headers=fields))[0], RequestHead)
    assert only_error(request(headers=fields + [("X-last", "v")])).status == 431


def test_an_endless_header_line_is_refused_with_bounded_memory():
    error = only_error([b"GET / HTTP/1.1\r\nX-Endless: "] + [b"v" * 4096] * 8)
    assert error.status == 431


def test_trailers_count_against_the_header_limits():
    data = request("POST", "/", [("Host", "a"), ("Transfer-Encoding", "chunked")],
                   b"1\r\na\r\n0\r\n" + b"".join(b"T%d: v\r\n" % i for i in range(101)) + b"\r\n")
    assert only_error(data).status == 431


# -- smuggling and protocol errors: status, and always close -----------------------------------------------------------

SMUGGLING_AND_ERRORS = {
    "content-length with transfer-encoding": (
        request("POST", "/", [("Host", "a"), ("Content-Length", "3"), ("Transfer-Encoding", "chunked")], b"0\r\n\r\n"),
        400),
    "transfer-encoding with content-length": (
        request("POST", "/", [("Host", "a"), ("Transfer-Encoding", "chunked"), ("Content-Length", "3")], b"0\r\n\r\n"),
        400),
    "conflicting content-lengths": (
        request("POST", "/", [("Host", "a"), ("Content-Length", "3"), ("Content-Length", "4")], b"abcd"), 400),
    "repeated equal content-lengths": (
        request("POST", "/", [("Host", "a"), ("Content-Length", "3"), ("Content-Length", "3")], b"abc"), 400),
    "content-length list": (request("POST", "/", [("Host", "a"), ("Content-Length", "3, 3")], b"abc"), 400),
    "negative content-length": (request("POST", "/", [("Host", "a"), ("Content-Length", "-1")]), 400),
    "missing host on 1.1": (request(headers=[]), 400),
    "duplicate host": (request(headers=[("Host", "a"), ("Host", "b")]), 400),
    "chunked twice": (request("POST", "/", [("Host", "a"), ("Transfer-Encoding", "chunked, chunked")]), 400),
    "transfer-encoding on 1.0": (
        request("POST", "/", [("Transfer-Encoding", "chunked")], b"0\r\n\r\n", version="1.0"), 400),
    "unknown transfer coding": (request("POST", "/", [("Host", "a"), ("Transfer-Encoding", "gzip")]), 501),
    "unknown coding before chunked": (
        request("POST", "/", [("Host", "a"), ("Transfer-Encoding", "gzip, chunked")], b"0\r\n\r\n"), 501),
    "http/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "tls client hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32, 400),
    "words, not a request": (b"hello there\r\n\r\n", 400),
    "bare line feeds": (b"GET / HTTP/1.1\nHost: a\n\n", 400),
    "obsolete line folding": (request(headers=[("Host", "a"), ("X", "b\r\n c")]), 400),
    "space before colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "bad chunk size": (request("POST", "/", [("Host", "a"), ("Transfer-Encoding", "chunked")], b"zz\r\n"), 400),
    "HTTP/1.2": (request(version="1.2"), 505),
    "HTTP/2.0 request line": (request(version="2.0"), 505),
    "HTTP/3.0": (request(version="3.0"), 505),
    "unknown method": (request("FOO"), 405),
    "lower-case method": (request("get"), 405),
    "unknown method sharing a prefix with PROPFIND": (request("PROPFINDX"), 405),
}


@pytest.mark.parametrize("name", SMUGGLING_AND_ERRORS)
def test_bad_requests_get_their_status_and_close(name):
    data, status = SMUGGLING_AND_ERRORS[name]
    error = only_error(data)
    assert error.status == status, error
    assert error.error == error_code(status)


def test_after_an_error_the_parser_ignores_everything():
    parser = RequestParser()
    parser.feed(b"\x16\x03garbage")
    assert isinstance(parser.next_event(), HttpError) and parser.failed
    parser.feed(request())
    assert parser.next_event() is None


def test_progress_properties_follow_the_message():
    parser = RequestParser()
    assert not parser.head_in_progress
    parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\n")
    assert parser.head_in_progress
    parser.feed(b"Content-Length: 4\r\n\r\nab")
    assert not parser.head_in_progress and parser.body_in_progress
    parser.feed(b"cd")
    assert not parser.body_in_progress


# -- independence from how the stream is cut into reads -----------------------------------------------------------------

def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[start:end] for start, end in zip([0] + points, points + [len(data)])]


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(SMUGGLING_AND_ERRORS)), cuts=st.lists(st.integers(0, 10_000), max_size=8))
def test_errors_do_not_depend_on_the_split(name, cuts):
    data, status = SMUGGLING_AND_ERRORS[name]
    assert only_error(split_at(data, cuts)).status == status


token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
header_value = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)


@st.composite
def request_sequences(draw):
    """Random valid requests (GET, or POST with a Content-Length or a chunked body) as bytes, and what they contain."""
    wire = b""
    expected = []
    for _ in range(draw(st.integers(1, 5))):
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
        target = "/" + "/".join(draw(st.lists(token, max_size=3)))
        fields = [("host", "example")] + [("x-" + name, value) for name, value in
                                          draw(st.lists(st.tuples(token, header_value), max_size=4))]
        body = draw(st.binary(max_size=300)) if method in ("POST", "PUT") else b""
        if method == "PUT":
            pieces = split_at(body, draw(st.lists(st.integers(0, 400), max_size=4)))
            chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
            wire += request(method, target, fields + [("transfer-encoding", "chunked")], chunks)
        else:
            framing = [("content-length", str(len(body)))] if method == "POST" else []
            wire += request(method, target, fields + framing, body)
        expected.append((method, target, [f for f in fields], body))
    return wire, expected


def summarize(events) -> list:
    summary, body = [], b""
    for event in events:
        if isinstance(event, RequestHead):
            fields = [(n, v) for n, v in event.headers if n not in ("content-length", "transfer-encoding")]
            current = [event.method, event.target, fields]
        elif isinstance(event, BodyChunk):
            body += event.data
        else:
            assert event is END_OF_MESSAGE, event
            summary.append((*current, body))
            body = b""
    return [tuple(item) for item in summary]


def h11_summary(wire: bytes) -> list:
    """The same summary computed by h11, an independent parser, for the same bytes."""
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(wire)
    summary, body = [], b""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            return summary
        if isinstance(event, h11.Request):
            fields = [(n.decode(), v.decode()) for n, v in event.headers
                      if n not in (b"content-length", b"transfer-encoding")]
            current = [event.method.decode(), event.target.decode(), fields]
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            summary.append((*current, body))
            body = b""
            # h11 parses one request at a time: pretend we answered so it moves on to the next.
            connection.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            connection.send(h11.EndOfMessage())
            connection.start_next_cycle()


@settings(max_examples=150, deadline=None)
@given(sequence=request_sequences(), cuts=st.lists(st.integers(0, 5000), max_size=10))
def test_random_requests_in_random_reads_parse_like_h11(sequence, cuts):
    wire, expected = sequence
    ours = summarize(parse(split_at(wire, cuts)))
    assert ours == [(m, t, f, b) for m, t, f, b in expected]
    assert ours == h11_summary(wire)


# -- response framing -------------------------------------------------------------------------------------------------

def frame(response, method="GET", version="1.1", keep_alive=True):
    return frame_response(response, request_method=method, request_version=version, keep_alive=keep_alive)


def head_fields(framed) -> dict[str, str]:
    lines = framed.data.decode("latin-1").split("\r\n")[1:-2]
    return {name.lower(): value for name, value in (line.split(": ", 1) for line in lines)}


async def _chunks():
    yield b"a"


def test_a_bytes_body_gets_a_content_length():
    framed = frame(Response(200, b"hello", content_type="text/plain"))
    assert framed.data.startswith(b"HTTP/1.1 200 OK\r\n") and framed.data.endswith(b"\r\n\r\n")
    fields = head_fields(framed)
    assert fields["content-length"] == "5" and fields["content-type"] == "text/plain"
    assert "date" in fields and fields["server"] == "iokit" and "connection" not in fields
    assert framed.framing is BodyFraming.LENGTH and not framed.close


def test_head_keeps_the_length_but_sends_no_body():
    framed = frame(Response(200, b"hello"), method="HEAD")
    assert head_fields(framed)["content-length"] == "5" and framed.framing is BodyFraming.NONE


@pytest.mark.parametrize("status", [204, 304])
def test_bodyless_statuses_have_no_length(status):
    framed = frame(Response(status))
    assert "content-length" not in head_fields(framed) and framed.framing is BodyFraming.NONE


def test_a_stream_is_chunked_for_http11_and_runs_until_close_for_http10():
    chunked = frame(Response(200, _chunks()))
    assert head_fields(chunked)["transfer-encoding"] == "chunked" and chunked.framing is BodyFraming.CHUNKED
    until_close = frame(Response(200, _chunks()), version="1.0")
    assert until_close.framing is BodyFraming.UNTIL_CLOSE and until_close.close
    assert head_fields(until_close)["connection"] == "close"


def test_a_stream_with_a_declared_length_is_not_chunked():
    framed = frame(Response(200, _chunks(), headers={"Content-Length": "1"}))
    assert framed.framing is BodyFraming.LENGTH and framed.content_length == 1


def test_connection_header_reflects_the_decision():
    assert head_fields(frame(Response(200), keep_alive=False))["connection"] == "close"
    assert head_fields(frame(Response(200), version="1.0"))["connection"] == "keep-alive"
    assert frame(Response(200, headers=[("Connection", "close")])).close


def test_server_owned_headers_from_a_handler_are_dropped():
    framed = frame(Response(200, b"x", headers=[("Transfer-Encoding", "chunked"), ("Connection", "keep-alive")]))
    fields = head_fields(framed)
    assert "transfer-encoding" not in fields and fields["content-length"] == "1"


def test_header_injection_and_wrong_lengths_are_refused():
    with pytest.raises(ValueError):
        frame(Response(200, headers=[("X", "a\r\nSet-Cookie: b")]))
    with pytest.raises(ValueError):
        frame(Response(200, b"abc", headers={"Content-Length": "2"}))


def test_error_responses_are_json():
    response = Response.from_error(HttpError(405, "no", headers=[("Allow", "GET")]))
    assert json.loads(response.body) == {"error": "method_not_allowed", "detail": "no"}
    assert response.header("allow") == "GET" and response.header("content-type") == "application/json"


def test_chunk_encoding():
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n" and encode_chunk(b"") == b"" and LAST_CHUNK == b"0\r\n\r\n"


# -- small pieces --------------------------------------------------------------------------------------------------------

def test_routing_params_head_and_405():
    app = App()

    async def handler(request):
        return Response()

    app.add_route("GET", "/", handler)
    app.add_route("PATCH", "/files/{upload_id}", handler, max_body_size=None)
    assert app.resolve("HEAD", "/").route.method == "GET"
    assert app.resolve("PATCH", "/files/a%20b").path_params == {"upload_id": "a b"}
    with pytest.raises(HttpError) as not_allowed:
        app.resolve("POST", "/")
    assert not_allowed.value.status == 405 and not_allowed.value.headers == [("Allow", "GET, HEAD")]
    with pytest.raises(HttpError) as missing:
        app.resolve("GET", "/files/a/b")
    assert missing.value.status == 404
    assert app.allowed_methods() == "GET, HEAD, PATCH"


def test_headers_multimap():
    headers = Headers([("Accept", "a"), ("accept", "b, C")])
    assert headers.get("ACCEPT") == "a" and headers.get_all("accept") == ["a", "b, C"]
    assert headers.get_tokens("accept") == ["a", "b", "c"] and headers.get("missing", "x") == "x"


def test_body_incomplete_says_how_much_arrived():
    error = BodyIncomplete(10, "connection closed")
    assert error.bytes_received == 10 and "10 bytes" in str(error)
