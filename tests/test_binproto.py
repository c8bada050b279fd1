"""The binary protocol: its sans-IO framing (property-based), then the example server and client as real processes.

The server is started once per backend; each test opens its own connections to it.
"""

from __future__ import annotations

import socket
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from example_servers import EXAMPLES, ServerProcess, backend_name, run_example_client  # noqa: F401 (fixture)
from binproto import (HEADER, LENGTH, VERSION, BinprotoLimits, ErrorCode, Frame, FrameDecoder, FrameError, Op,
                      encode_frame, error_frame, parse_error, parse_sleep, sleep_frame)

# -- framing, sans-IO ------------------------------------------------------------------------------------------------

frames = st.builds(Frame, op=st.integers(0, 255), request_id=st.integers(0, 2**32 - 1),
                   payload=st.binary(max_size=200), flags=st.integers(0, 2**16 - 1))


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    return [data[start:end] for start, end in zip([0] + points, points + [len(data)])]


def decode_all(pieces: list[bytes], decoder: FrameDecoder | None = None) -> list[Frame]:
    decoder = decoder or FrameDecoder()
    decoded = []
    for piece in pieces:
        decoder.feed(piece)
        while (frame := decoder.next_frame()) is not None:
            decoded.append(frame)
    return decoded


@settings(max_examples=200, deadline=None)
@given(sequence=st.lists(frames, max_size=20), cuts=st.lists(st.integers(0, 10**5), max_size=30))
def test_any_frame_sequence_in_any_reads_decodes_to_itself(sequence, cuts):
    wire = b"".join(encode_frame(frame) for frame in sequence)
    decoder = FrameDecoder()
    assert decode_all(split_at(wire, cuts), decoder) == sequence
    assert not decoder.frame_in_progress


@settings(max_examples=100, deadline=None)
@given(good=st.lists(frames, max_size=5), version=st.integers(0, 255).filter(lambda v: v != VERSION),
       cuts=st.lists(st.integers(0, 10**4), max_size=10))
def test_a_bad_version_after_good_frames_fails_whatever_the_split(good, version, cuts):
    wire = b"".join(encode_frame(frame) for frame in good) + encode_frame(Frame(Op.PING, 7, version=version))
    decoder = FrameDecoder()
    with pytest.raises(FrameError) as failure:
        decode_all(split_at(wire, cuts), decoder)
    assert failure.value.code == ErrorCode.BAD_VERSION


def test_an_oversized_length_is_refused_from_its_four_bytes():
    decoder = FrameDecoder(max_frame_bytes=1024 * 1024)
    decoder.feed(LENGTH.pack(1024 * 1024 + 1))
    with pytest.raises(FrameError) as failure:
        decoder.next_frame()
    assert failure.value.code == ErrorCode.BAD_LENGTH


def test_a_frame_of_exactly_the_limit_is_accepted():
    limit = BinprotoLimits().max_frame_bytes
    frame = Frame(Op.ECHO, 1, b"x" * (limit - HEADER.size))
    assert decode_all([encode_frame(frame)], FrameDecoder(limit)) == [frame]


def test_a_length_shorter_than_the_header_is_refused():
    decoder = FrameDecoder()
    decoder.feed(LENGTH.pack(3) + b"\x01\x01\x00")
    with pytest.raises(FrameError) as failure:
        decoder.next_frame()
    assert failure.value.code == ErrorCode.BAD_LENGTH


def test_bad_version_reports_the_request_id_when_known():
    decoder = FrameDecoder()
    decoder.feed(encode_frame(Frame(Op.PING, 4242, version=2)))
    with pytest.raises(FrameError) as failure:
        decoder.next_frame()
    assert failure.value.request_id == 4242


def test_error_and_sleep_payloads():
    error = error_frame(9, ErrorCode.UNKNOWN_OP, "op 7 is unknown")
    assert error.op == Op.ERROR and parse_error(error.payload) == (ErrorCode.UNKNOWN_OP, "op 7 is unknown")
    limits = BinprotoLimits()
    assert parse_sleep(sleep_frame(1, 10_000).payload, limits) == 10_000
    with pytest.raises(ValueError):
        parse_sleep(sleep_frame(1, 10_001).payload, limits)
    with pytest.raises(ValueError):
        parse_sleep(b"\x00", limits)


def test_default_limits_are_the_documented_ones():
    limits = BinprotoLimits()
    assert (limits.max_frame_bytes, limits.frame_timeout, limits.max_in_flight, limits.max_sleep_ms) == (
        1024 * 1024, 10.0, 64, 10_000)


# -- the server, driven over real sockets on every backend ---------------------------------------------------------------

@pytest.fixture(scope="module")
def server(backend_name):
    with ServerProcess(EXAMPLES / "binproto_server.py", backend_name, "--frame-timeout", "1") as process:
        yield process


def connect(server) -> socket.socket:
    connection = socket.create_connection(server.address, timeout=10)
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def read_frames(connection: socket.socket, count: int, decoder: FrameDecoder | None = None) -> list[Frame]:
    decoder = decoder or FrameDecoder(max_frame_bytes=2 * 1024 * 1024)
    received: list[Frame] = []
    while len(received) < count:
        while (frame := decoder.next_frame()) is not None:
            received.append(frame)
        if len(received) >= count:
            break
        data = connection.recv(65536)
        if not data:
            break
        decoder.feed(data)
    return received


def read_until_closed(connection: socket.socket) -> bytes:
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    return data


def test_ping_echo_sleep_in_order_with_ids(server):
    with connect(server) as connection:
        requests = [sleep_frame(1, 300), Frame(Op.PING, 2), Frame(Op.ECHO, 3, b"payload"), sleep_frame(4, 0)]
        started = time.monotonic()
        connection.sendall(b"".join(encode_frame(frame) for frame in requests))
        replies = read_frames(connection, 4)
        elapsed = time.monotonic() - started
    assert [(reply.op, reply.request_id) for reply in replies] == [(Op.SLEEP, 1), (Op.PING, 2), (Op.ECHO, 3),
                                                                   (Op.SLEEP, 4)]
    assert replies[2].payload == b"payload"
    assert 0.25 < elapsed < 3


def test_sleeps_overlap_rather_than_queue(server):
    with connect(server) as connection:
        connection.sendall(b"".join(encode_frame(sleep_frame(i, 300)) for i in range(20)))
        started = time.monotonic()
        replies = read_frames(connection, 20)
        assert [reply.request_id for reply in replies] == list(range(20))
        assert time.monotonic() - started < 2.0


def test_unknown_op_and_bad_argument_keep_the_connection(server):
    with connect(server) as connection:
        connection.sendall(encode_frame(Frame(0x42, 11)) + encode_frame(sleep_frame(12, 10_001))
                           + encode_frame(Frame(Op.PING, 13)))
        unknown, bad_argument, ping = read_frames(connection, 3)
    assert (unknown.op, unknown.request_id) == (Op.ERROR, 11)
    assert parse_error(unknown.payload)[0] == ErrorCode.UNKNOWN_OP
    assert parse_error(bad_argument.payload)[0] == ErrorCode.BAD_ARGUMENT
    assert (ping.op, ping.request_id) == (Op.PING, 13)


@pytest.mark.parametrize("wire, code", [
    (encode_frame(Frame(Op.PING, 5, version=2)), ErrorCode.BAD_VERSION),
    (LENGTH.pack(1024 * 1024 + 1), ErrorCode.BAD_LENGTH),
    (LENGTH.pack(2) + b"\x01\x01", ErrorCode.BAD_LENGTH),
], ids=["bad-version", "oversized", "undersized"])
def test_fatal_errors_answer_then_close(server, wire, code):
    with connect(server) as connection:
        connection.sendall(encode_frame(Frame(Op.PING, 1)) + wire)
        decoder = FrameDecoder()
        decoder.feed(read_until_closed(connection))
        ping, error = decoder.next_frame(), decoder.next_frame()
    assert ping.op == Op.PING and error.op == Op.ERROR and parse_error(error.payload)[0] == code


def test_an_unfinished_frame_times_out_with_error_then_close(server):
    with connect(server) as connection:
        connection.sendall(encode_frame(Frame(Op.ECHO, 1, b"abc"))[:6])
        started = time.monotonic()
        decoder = FrameDecoder()
        decoder.feed(read_until_closed(connection))
        error = decoder.next_frame()
        assert 0.8 < time.monotonic() - started < 5
    assert error.op == Op.ERROR and parse_error(error.payload)[0] == ErrorCode.FRAME_TIMEOUT


def test_in_flight_requests_are_capped_at_64(server):
    # 192 sleeps of 200 ms: with at most 64 in flight the server reads them in three waves (>= 600 ms); without the
    # cap all would finish together after about 200 ms.
    with connect(server) as connection:
        connection.sendall(b"".join(encode_frame(sleep_frame(i, 200)) for i in range(192)))
        started = time.monotonic()
        replies = read_frames(connection, 192)
        elapsed = time.monotonic() - started
    assert [reply.request_id for reply in replies] == list(range(192))
    assert 0.55 < elapsed < 5


def test_a_large_echo_round_trips(server):
    payload = bytes(range(256)) * 4000  # about 1 MB, under the frame limit
    with connect(server) as connection:
        connection.sendall(encode_frame(Frame(Op.ECHO, 77, payload)))
        (reply,) = read_frames(connection, 1)
    assert reply.payload == payload and reply.request_id == 77


def test_the_example_client(server):
    output = run_example_client(EXAMPLES / "binproto_client.py", server, "--requests", "200", "--connections", "4")
    assert "errors=0" in output and "replies=200" in output
