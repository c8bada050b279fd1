"""The resumable upload server (tus 1.0.0 subset) on every backend: its sans-IO header rules, its store on a fake clock,
then the server as a real process driven by tuspy (a client nobody here wrote), curl, raw sockets and our own client.

Most servers keep their uploads on tmpfs (/dev/shm) for speed; the crash test keeps them on the real disk, because what
it checks is what fdatasync promised. The disk-full test mounts a 1 MiB tmpfs (root only; it skips with the reason
otherwise).
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import iokit
from example_servers import EXAMPLES, ServerProcess, backend_name, run_example_client, wait_until  # noqa: F401
from iokit.http import HttpError
from iokit.tus import Durability, UploadLimits, UploadStore, protocol
from iokit.tus.files import Record, UploadFiles

SERVER = EXAMPLES / "upload_server.py"
CLIENT = EXAMPLES / "upload_client.py"
KIB = 1024
MIB = 1024 * KIB
FLUSH_INTERVAL = 0.2
# The crash test allows async mode to lose what arrived in one flush interval, plus the time a flush itself takes
# (write, fdatasync, record) and scheduling: this slack.
FLUSH_SLACK = 0.15
SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


def random_file(directory: str, size: int, name: str = "source.bin") -> str:
    path = os.path.join(directory, name)
    with open(path, "wb") as file:
        file.write(os.urandom(size))
    return path


def sha256_of(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


@pytest.fixture(scope="module")
def tusclient():
    """tuspy's client module (the outside client of this pattern); its tests skip, with the reason, without it."""
    return pytest.importorskip("tusclient.client", reason="tuspy is not installed (pip install tuspy)")


@pytest.fixture(scope="module")
def fast_dir():
    directory = tempfile.mkdtemp(prefix="iokit-upload-", dir=SHM)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def start_upload_server(backend: str, directory: str, *arguments: str) -> ServerProcess:
    return ServerProcess(SERVER, backend, "--dir", directory, *arguments)


@pytest.fixture(scope="module")
def server(backend_name, fast_dir):
    with start_upload_server(backend_name, os.path.join(fast_dir, "sync"), "--durability", "sync") as process:
        yield process


@pytest.fixture(scope="module")
def async_server(backend_name, fast_dir):
    with start_upload_server(backend_name, os.path.join(fast_dir, "async"), "--durability", "async") as process:
        yield process


@pytest.fixture(scope="module")
def expiring_server(backend_name, fast_dir):
    with start_upload_server(backend_name, os.path.join(fast_dir, "expiring"), "--expiry-seconds", "1",
                             "--sweep-interval", "0.3") as process:
        yield process


# -- talking to the server ---------------------------------------------------------------------------------------------

def tus(server, method: str, path: str, headers: dict[str, str] | None = None, body=None,
        version: str | None = protocol.TUS_VERSION) -> tuple[int, dict[str, str], bytes]:
    """Send one request; return (status, headers with lower-cased names, body)."""
    connection = http.client.HTTPConnection(*server.address, timeout=30)
    try:
        all_headers = {"Tus-Resumable": version} if version else {}
        all_headers.update(headers or {})
        connection.request(method, path, body=body, headers=all_headers, encode_chunked=not isinstance(body, bytes)
                           and body is not None)
        response = connection.getresponse()
        return response.status, {name.lower(): value for name, value in response.getheaders()}, response.read()
    finally:
        connection.close()


def create(server, length: int, **headers: str) -> str:
    status, answer, body = tus(server, "POST", "/files", {"Upload-Length": str(length), **headers})
    assert status == 201, body
    return answer["location"]


def patch(server, path: str, offset: int, data, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return tus(server, "PATCH", path, {"Content-Type": "application/offset+octet-stream",
                                       "Upload-Offset": str(offset), **headers}, data)


def offset_of(server, path: str) -> int:
    status, headers, _ = tus(server, "HEAD", path)
    assert status == 200
    return int(headers["upload-offset"])


def settled_offset_of(server, path: str) -> int | None:
    """The offset, or ``None`` while a chunk is being committed (423: a cut-off chunk is still being kept)."""
    status, headers, _ = tus(server, "HEAD", path)
    if status == 423:
        return None
    assert status == 200
    return int(headers["upload-offset"])


def curl(*arguments: str) -> tuple[int, str]:
    """Run curl; return (status, the response head and body as text)."""
    done = subprocess.run(["curl", "-sS", "-i", "--max-time", "15", *arguments], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode("latin-1")
    return int(text.split(" ", 2)[1]), text


def raw_patch_head(path: str, offset: int, content_length: int) -> bytes:
    return (f"PATCH {path} HTTP/1.1\r\nHost: test\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
            f"Content-Length: {content_length}\r\n\r\n").encode()


def data_file(directory: str, path: str) -> str:
    return os.path.join(directory, path.rsplit("/", 1)[1] + ".data")


# -- sans-IO: the header rules -----------------------------------------------------------------------------------------

def status_of(function, *arguments) -> int:
    with pytest.raises(HttpError) as caught:
        function(*arguments)
    return caught.value.status


def test_metadata_round_trips_and_malformed_metadata_is_400():
    value = "filename d29ybGRfZG9taW5hdGlvbl9wbGFuLnBkZg==,is_confidential"
    pairs = protocol.parse_metadata(value, 4096)
    assert pairs == {"filename": b"world_domination_plan.pdf", "is_confidential": b""}
    assert protocol.encode_metadata(pairs) == value
    assert protocol.parse_metadata(None, 4096) == {}
    for bad in ("filename not*base64", "a YQ==,a YQ==", ",", "filename YQ==, ", "x" * 5000):
        assert status_of(protocol.parse_metadata, bad, 4096) == 400, bad


def test_offsets_and_lengths_are_plain_non_negative_integers():
    assert protocol.parse_upload_offset("0") == 0
    assert protocol.parse_upload_length("100", 1000) == 100
    for bad in (None, "", "-1", "+5", " 5", "1e3", "0x10", "9" * 30):
        assert status_of(protocol.parse_upload_offset, bad) == 400, bad
    assert status_of(protocol.parse_upload_length, "1001", 1000) == 413


def test_checksum_header():
    digest = hashlib.sha1(b"hello world").digest()
    assert protocol.parse_checksum("sha1 " + base64.b64encode(digest).decode()) == protocol.Checksum("sha1", digest)
    assert protocol.parse_checksum(None) is None
    for bad in ("crc32 AAAAAA==", "sha1 !!!", "md5 " + base64.b64encode(digest).decode(), "sha1"):
        assert status_of(protocol.parse_checksum, bad) == 400, bad


def test_concat_header_accepts_only_our_own_upload_urls():
    a, b = "a" * 32, "b" * 32
    final = protocol.parse_concat(f"final;/files/{a} http://example.com/files/{b}")
    assert final == protocol.Concat("final", (a, b))
    assert final.header_value() == f"final;/files/{a} /files/{b}"
    assert protocol.parse_concat("partial") == protocol.Concat("partial")
    for bad in ("final;", "final;/files/../../etc/passwd", f"final;/other/{a}", "whole", f"final /files/{a}"):
        assert status_of(protocol.parse_concat, bad) == 400, bad


def test_ids_are_128_random_bits_in_lowercase_hex():
    ids = {protocol.new_upload_id() for _ in range(100)}
    assert len(ids) == 100 and all(protocol.is_upload_id(upload_id) for upload_id in ids)
    for bad in ("A" * 32, "a" * 31, "a" * 33, "../" + "a" * 29, "g" * 32, ""):
        assert not protocol.is_upload_id(bad)


# -- the store on a fake clock, and what it loads after a crash --------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_store_expiry_follows_the_injected_clock(backend_name, tmp_path):
    clock = FakeClock()
    store = UploadStore(str(tmp_path), Durability.SYNC, UploadLimits(expiry_seconds=100), clock=clock)

    async def scenario():
        await store.open()
        unfinished = await store.create(10, {})
        finished = await store.create(0, {})
        assert store.expires_at(unfinished) == clock.now + 100 and store.expires_at(finished) is None
        clock.now += 99
        assert await store.lookup(unfinished.id) is unfinished
        clock.now += 1
        for _ in range(2):  # found expired, then remembered as expired
            with pytest.raises(HttpError) as caught:
                await store.lookup(unfinished.id)
            assert caught.value.status == 410
        assert await store.lookup(finished.id) is finished
        assert not os.path.exists(unfinished.files.data)
        return unfinished.id

    expired_id = iokit.run(scenario, backend=backend_name)
    reopened = UploadStore(str(tmp_path), Durability.SYNC, UploadLimits(expiry_seconds=100), clock=clock)

    async def after_restart():
        await reopened.open()
        for upload_id, status in ((expired_id, 410), ("0" * 32, 404)):
            with pytest.raises(HttpError) as caught:
                await reopened.lookup(upload_id)
            assert caught.value.status == status

    iokit.run(after_restart, backend=backend_name)


def test_loading_trusts_the_record_and_never_more_than_the_disk(backend_name, tmp_path):
    directory = str(tmp_path)
    longer, shorter = "1" * 32, "2" * 32
    for upload_id, data, durable in ((longer, b"x" * 100, 40), (shorter, b"y" * 10, 30)):
        files = UploadFiles(directory, upload_id)
        with open(files.data, "wb") as file:
            file.write(data)
        with open(files.record, "wb") as file:
            file.write(Record(upload_id, length=100, durable_offset=durable, updated_at=time.time()).encode())
    with open(os.path.join(directory, "3" * 32 + ".data"), "wb") as file:
        file.write(b"orphan: its creation never got a record")
    with open(os.path.join(directory, longer + ".info.tmp"), "wb") as file:
        file.write(b"half a record")
    store = UploadStore(directory, Durability.SYNC)

    async def scenario():
        await store.open()
        return (await store.lookup(longer)).offset, (await store.lookup(shorter)).offset

    assert iokit.run(scenario, backend=backend_name) == (40, 10)
    assert os.path.getsize(os.path.join(directory, longer + ".data")) == 40  # unrecorded bytes cut back
    assert sorted(os.listdir(directory)) == sorted(f"{upload_id}{suffix}" for upload_id in (longer, shorter)
                                                   for suffix in (".data", ".info"))


# -- the protocol over HTTP --------------------------------------------------------------------------------------------

def test_options_advertises_what_the_server_supports(server):
    status, text = curl("-X", "OPTIONS", server.url + "/files")
    assert status == 204
    for line in ("Tus-Version: 1.0.0", "Tus-Extension: creation,termination,checksum,expiration,concatenation",
                 "Tus-Checksum-Algorithm: sha1,md5", "Tus-Max-Size: 4294967296"):
        assert line in text


def test_curl_creates_patches_heads_downloads_and_deletes(server):
    status, text = curl("-X", "POST", "-H", "Tus-Resumable: 1.0.0", "-H", "Upload-Length: 11",
                        "-H", "Upload-Metadata: filename aGVsbG8udHh0", server.url + "/files")
    assert status == 201
    path = next(line.split(": ", 1)[1].strip() for line in text.splitlines() if line.startswith("Location:"))
    assert protocol.is_upload_id(path.removeprefix("/files/"))
    expires = next(line for line in text.splitlines() if line.startswith("Upload-Expires:"))
    assert time.time() + 23 * 3600 < email_date(expires.split(": ", 1)[1]) <= time.time() + 24 * 3600 + 5
    common = ["-H", "Tus-Resumable: 1.0.0", "-H", "Content-Type: application/offset+octet-stream"]
    status, text = curl("-X", "PATCH", *common, "-H", "Upload-Offset: 0", "--data-binary", "hello", server.url + path)
    assert status == 204 and "Upload-Offset: 5" in text and "Iokit-Durable-Offset: 5" in text
    status, text = curl("-I", "-H", "Tus-Resumable: 1.0.0", server.url + path)
    assert status == 200
    for line in ("Upload-Offset: 5", "Upload-Length: 11", "Cache-Control: no-store", "Iokit-Durable-Offset: 5",
                 "Upload-Metadata: filename aGVsbG8udHh0"):
        assert line in text
    status, _ = curl(server.url + path)
    assert status == 409  # not finished: nothing to download yet
    status, _ = curl("-X", "PATCH", *common, "-H", "Upload-Offset: 5", "--data-binary", " world", server.url + path)
    assert status == 204
    assert tus(server, "GET", path, version=None)[::2] == (200, b"hello world")
    assert tus(server, "DELETE", path)[0] == 204
    assert tus(server, "HEAD", path)[0] == 404


def email_date(text: str) -> float:
    return email.utils.parsedate_to_datetime(text).timestamp()


def test_wrong_offset_is_409_and_changes_nothing(server):
    path = create(server, 10)
    assert patch(server, path, 0, b"abcd")[0] == 204
    for wrong in (0, 2, 5, 10):
        assert patch(server, path, wrong, b"XY")[0] == 409
    assert offset_of(server, path) == 4
    assert patch(server, path, 4, b"efghij")[0] == 204
    assert tus(server, "GET", path)[2] == b"abcdefghij"


@pytest.mark.parametrize("version", [None, "0.2.2", "1.0"])
def test_missing_or_wrong_tus_resumable_is_412_for_every_tus_method(server, version):
    path = create(server, 4)
    attempts = [("POST", "/files", {"Upload-Length": "4"}, None), ("HEAD", path, {}, None),
                ("PATCH", path, {"Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}, b"data"),
                ("DELETE", path, {}, None)]
    for method, target, headers, body in attempts:
        status, answer, _ = tus(server, method, target, headers, body, version=version)
        assert status == 412, method
        assert answer["tus-version"] == "1.0.0"
    assert offset_of(server, path) == 0


def test_a_patch_that_is_not_offset_octet_stream_is_415(server):
    path = create(server, 4)
    status, text = curl("-X", "PATCH", "-H", "Tus-Resumable: 1.0.0", "-H", "Upload-Offset: 0",
                        "-H", "Content-Type: application/octet-stream", "--data-binary", "data", server.url + path)
    assert status == 415 and '"error":"unsupported_media_type"' in text
    assert offset_of(server, path) == 0


def test_bytes_beyond_the_declared_length_are_413_and_change_nothing(server):
    path = create(server, 8)
    assert patch(server, path, 0, b"12345")[0] == 204
    assert patch(server, path, 5, b"6789")[0] == 413                        # Content-Length says so up front
    assert patch(server, path, 5, iter([b"67", b"89"]))[0] == 413            # a chunked body that runs past
    assert offset_of(server, path) == 5
    assert tus(server, "POST", "/files", {"Upload-Length": str(8 * 1024**3)})[0] == 413  # over Tus-Max-Size


def test_a_second_patch_while_one_is_writing_is_423(server):
    path = create(server, 2 * MIB)
    with socket.create_connection(server.address) as first:
        first.sendall(raw_patch_head(path, 0, MIB) + b"a" * (MIB // 2))
        # A wrong offset, so that asking before the first PATCH holds the upload changes nothing (409, not 204).
        assert wait_until(lambda: patch(server, path, 12345, b"b" * 10)[0] == 423, timeout=5)
        assert tus(server, "DELETE", path)[0] == 423
        first.sendall(b"a" * (MIB // 2))
        assert first.recv(4096).startswith(b"HTTP/1.1 204")
    assert offset_of(server, path) == MIB


def test_patching_a_final_upload_is_403_and_unknown_or_malformed_ids_are_404(server):
    part = create(server, 3, **{"Upload-Concat": "partial"})
    assert patch(server, part, 0, b"abc")[0] == 204
    status, headers, _ = tus(server, "POST", "/files", {"Upload-Concat": f"final;{part} {part}"})
    assert status == 201
    final = headers["location"]
    assert patch(server, final, 6, b"")[0] == 403
    status, headers, _ = tus(server, "HEAD", final)
    assert headers["upload-offset"] == headers["upload-length"] == "6"
    assert headers["upload-concat"] == f"final;{part} {part}"
    assert tus(server, "GET", final)[2] == b"abcabc"
    for path in ("/files/" + "0" * 32, "/files/" + "A" * 32, "/files/" + "a" * 31, "/files/..%2F..%2Fetc%2Fpasswd",
                 "/files/%2e%2e", "/files/" + "a" * 32 + ".data"):
        assert tus(server, "HEAD", path)[0] == 404, path
        assert patch(server, path, 0, b"x")[0] == 404, path


def test_a_checksum_mismatch_is_460_and_the_chunk_is_discarded(server):
    path = create(server, 11)
    good = base64.b64encode(hashlib.md5(b"hello").digest()).decode()
    wrong = base64.b64encode(hashlib.md5(b"jello").digest()).decode()
    status, headers, body = patch(server, path, 0, b"hello", **{"Upload-Checksum": "md5 " + wrong})
    assert status == 460 and b"checksum_mismatch" in body
    assert offset_of(server, path) == 0
    assert patch(server, path, 0, b"hello", **{"Upload-Checksum": "md5 " + good})[0] == 204
    assert patch(server, path, 5, b" world", **{"Upload-Checksum": "crc32 AAAAAA=="})[0] == 400
    assert offset_of(server, path) == 5


def test_malformed_creation_headers_are_400(server):
    for headers in ({"Upload-Length": "-1"}, {"Upload-Length": "10", "Upload-Metadata": "key not-base64!"},
                    {"Upload-Length": "10", "Upload-Metadata": "a YQ==,a Yg=="}, {},
                    {"Upload-Length": "10", "Upload-Concat": "final;/files/nope"},
                    {"Upload-Defer-Length": "1"}):
        assert tus(server, "POST", "/files", headers)[0] == 400, headers


def test_a_final_needs_finished_partial_uploads(server):
    unfinished = create(server, 5, **{"Upload-Concat": "partial"})
    plain = create(server, 0)
    assert tus(server, "POST", "/files", {"Upload-Concat": f"final;{unfinished}"})[0] == 400
    assert tus(server, "POST", "/files", {"Upload-Concat": f"final;{plain}"})[0] == 400
    assert tus(server, "POST", "/files", {"Upload-Concat": "final;/files/" + "0" * 32})[0] == 404


def test_an_unfinished_upload_expires_and_then_answers_410(expiring_server, fast_dir):
    path = create(expiring_server, 10)
    finished = create(expiring_server, 2)
    assert patch(expiring_server, path, 0, b"abc")[0] == 204
    assert patch(expiring_server, finished, 0, b"ok")[0] == 204
    assert wait_until(lambda: tus(expiring_server, "HEAD", path)[0] == 410, timeout=5)
    assert patch(expiring_server, path, 3, b"def")[0] == 410
    assert not os.path.exists(data_file(os.path.join(fast_dir, "expiring"), path))
    assert tus(expiring_server, "GET", finished)[::2] == (200, b"ok")  # finished uploads do not expire


# -- bodies cut off, and tuspy -----------------------------------------------------------------------------------------

def send_and_cut_off(server, path: str, offset: int, content_length: int, data: bytes, **headers: str) -> None:
    extra = "".join(f"{name.replace('_', '-')}: {value}\r\n" for name, value in headers.items()).encode()
    with socket.create_connection(server.address) as connection:
        head = raw_patch_head(path, offset, content_length)
        connection.sendall(head[:-2] + extra + b"\r\n" + data)


@pytest.mark.parametrize("which", ["server", "async_server"])
def test_a_body_cut_off_mid_chunk_keeps_what_arrived_and_tuspy_resumes(backend_name, which, request, tmp_path,
                                                                       tusclient):
    server = request.getfixturevalue(which)
    source = random_file(str(tmp_path), 24 * MIB)
    uploader = tusclient.TusClient(server.url + "/files").uploader(source, chunk_size=8 * MIB)
    url = uploader.create_url()
    path = "/files/" + url.rsplit("/", 1)[1]
    with open(source, "rb") as file:
        arrived = file.read(3 * MIB + 12345)
    send_and_cut_off(server, path, 0, 8 * MIB, arrived)
    assert wait_until(lambda: settled_offset_of(server, path) == len(arrived), timeout=10)
    resumed = tusclient.TusClient(server.url + "/files").uploader(source, url=url, chunk_size=8 * MIB)
    assert resumed.offset == len(arrived)
    resumed.upload()
    assert hashlib.sha256(tus(server, "GET", path)[2]).hexdigest() == sha256_of(source)


def test_a_cut_off_chunk_with_a_checksum_is_discarded(server):
    path = create(server, MIB)
    digest = base64.b64encode(hashlib.sha1(b"z" * MIB).digest()).decode()
    send_and_cut_off(server, path, 0, MIB, b"z" * 1000, **{"Upload-Checksum": "sha1 " + digest})
    time.sleep(0.3)
    assert offset_of(server, path) == 0


@pytest.mark.parametrize("which, checksum", [("server", False), ("async_server", True)])
def test_tuspy_uploads_64_mib_and_the_sha256_matches(backend_name, which, checksum, request, tmp_path, tusclient):
    server = request.getfixturevalue(which)
    source = random_file(str(tmp_path), 64 * MIB)
    uploader = tusclient.TusClient(server.url + "/files").uploader(source, chunk_size=8 * MIB, upload_checksum=checksum,
                                                                   metadata={"filename": "source.bin"})
    uploader.upload()
    path = "/files/" + uploader.url.rsplit("/", 1)[1]
    status, headers, body = tus(server, "GET", path, version=None)
    assert status == 200 and hashlib.sha256(body).hexdigest() == sha256_of(source)
    assert tus(server, "HEAD", path)[1]["upload-metadata"] == "filename " + base64.b64encode(b"source.bin").decode()


def test_our_client_sends_parts_1_3_2_and_the_final_matches(server, tmp_path):
    source = random_file(str(tmp_path), 9 * MIB + 7)
    output = run_example_client(CLIENT, server, source, "--order", "1,3,2", "--chunk-size", str(MIB),
                                "--checksum", "sha1")
    assert "verified=yes" in output and f"sha256={sha256_of(source)}" in output
    output = run_example_client(CLIENT, server, source, "--parts", "4", "--parallel", "4")
    assert "verified=yes" in output


# -- a full disk -------------------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here: {done.stderr.decode().strip() or done.returncode}")
    try:
        yield str(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_a_full_disk_is_507_and_the_upload_stays_consistent(backend_name, tiny_disk, durability):
    directory = os.path.join(tiny_disk, "uploads")
    with start_upload_server(backend_name, directory, "--durability", durability) as server:
        path = create(server, 2 * MIB)
        assert patch(server, path, 0, b"a" * (2 * MIB))[0] == 507       # refused up front: no room for it
        assert offset_of(server, path) == 0 and os.path.getsize(data_file(directory, path)) == 0
        assert patch(server, path, 0, b"b" * (512 * KIB))[0] == 204
        chunked = iter([b"c" * (64 * KIB)] * 10)                         # no Content-Length: fails while writing
        assert patch(server, path, 512 * KIB, chunked)[0] == 507
        assert offset_of(server, path) == 512 * KIB
        assert wait_until(lambda: tus(server, "HEAD", path)[1]["iokit-durable-offset"] == str(512 * KIB), timeout=2)
        assert wait_until(lambda: os.path.getsize(data_file(directory, path)) == 512 * KIB, timeout=2)
        assert tus(server, "DELETE", path)[0] == 204
        small = create(server, 300 * KIB)                                # room again once it is gone
        assert patch(server, small, 0, b"d" * (300 * KIB))[0] == 204
        assert tus(server, "GET", small)[2] == b"d" * (300 * KIB)


# -- crashes and restarts ----------------------------------------------------------------------------------------------

def read_ack_log(path: str) -> list[tuple[str, float, int, int]]:
    with open(path) as file:
        return [(event, float(when), int(offset), int(durable))
                for event, when, offset, durable in (line.split() for line in file)]


def restart_on(backend: str, directory: str, port: int, durability: str) -> ServerProcess:
    """Start the server again on ``port`` (retrying while the killed one's port is still being released)."""
    for _ in range(50):
        process = start_upload_server(backend, directory, "--durability", durability, "--port", str(port))
        try:
            process.start()
            return process
        except AssertionError:
            time.sleep(0.1)
    raise AssertionError(f"could not restart on port {port}")


def crash_trial(backend: str, durability: str, directory: str, scratch: str) -> dict:
    """Upload with our client (acknowledged offsets logged), kill -9 the server at ~40 %, restart it on the same
    directory and port, and let the client resume. Return what the log says."""
    size = 24 * MIB
    source = random_file(scratch, size, f"source-{durability}.bin")
    ack_log = os.path.join(scratch, f"acks-{durability}.log")
    first = start_upload_server(backend, directory, "--durability", durability)
    first.start()
    client = subprocess.Popen([sys.executable, str(CLIENT), "--port", str(first.port), source, "--chunk-size",
                               str(256 * KIB), "--rate", "12", "--ack-log", ack_log, "--retry-seconds", "30"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        assert wait_until(lambda: os.path.exists(ack_log) and any(
            offset >= 0.4 * size for _, _, offset, _ in read_ack_log(ack_log)), timeout=20)
        killed_at = time.time()
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        second = restart_on(backend, directory, first.port, durability)
        output, errors = client.communicate(timeout=60)
        assert client.returncode == 0 and "verified=yes" in output, errors
        assert second.stop() == 0, second.stderr_text
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
        for server in (first, second):
            if server is not None:
                server.stop()
    events = read_ack_log(ack_log)
    resume = next(entry for entry in events if entry[0] == "resume" and entry[1] > killed_at)
    acked_before_kill = [(when, offset) for event, when, offset, _ in events if event == "ack" and when <= killed_at]
    return {"killed_at": killed_at, "resume_offset": resume[2], "resume_durable": resume[3],
            "acked_before_kill": acked_before_kill}


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_kill_9_mid_upload_then_restart_and_resume(backend_name, durability, tmp_path):
    # tmp_path is on the real disk here (not tmpfs): this is about what fdatasync made durable.
    trial = crash_trial(backend_name, durability, str(tmp_path / "uploads"), str(tmp_path))
    last_acked = trial["acked_before_kill"][-1][1]
    resumed = trial["resume_offset"]
    assert resumed == trial["resume_durable"], "after a restart the offset is the durable one"
    if durability == "sync":
        assert resumed >= last_acked, f"sync lost acknowledged bytes: resumed at {resumed}, acked {last_acked}"
    else:
        older = [offset for when, offset in trial["acked_before_kill"]
                 if when <= trial["killed_at"] - FLUSH_INTERVAL - FLUSH_SLACK]
        assert resumed >= (older[-1] if older else 0), "async lost more than one flush interval"
    print(f"crash trial {backend_name}/{durability}: last acknowledged {last_acked}, resumed at {resumed}, "
          f"lost {max(0, last_acked - resumed)} bytes")


def test_sigterm_flushes_async_bytes_before_exiting(backend_name, tmp_path):
    directory = str(tmp_path / "uploads")
    with start_upload_server(backend_name, directory, "--durability", "async", "--flush-interval", "30") as server:
        path = create(server, MIB)
        status, headers, _ = patch(server, path, 0, b"q" * 1000)
        assert status == 204 and headers["iokit-durable-offset"] == "0"  # acknowledged from memory
    with start_upload_server(backend_name, directory, "--durability", "async") as server:
        assert tus(server, "HEAD", path)[1]["iokit-durable-offset"] == "1000"
