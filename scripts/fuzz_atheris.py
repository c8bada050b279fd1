"""Coverage-guided fuzzing of the parsers that read client bytes, with atheris (libFuzzer for Python).

Hypothesis (tests/test_fuzz.py) draws inputs from shapes we thought of; libFuzzer mutates bytes towards code it has not
reached yet, which finds the shapes we did not think of. Each target checks the same promises as the property tests:

* ``http``: ``RequestParser`` fed the input whole and cut at a point taken from the input: no exception, an error is the
  last event with a documented status, and both cuts give the same events (but for the documented 405/400 case).
* ``tus``: the first byte picks a header parser (Upload-Concat, -Metadata, -Checksum, -Offset, -Length, Tus-Resumable,
  Content-Type), the rest is its value decoded as latin-1 (as the HTTP core decodes headers): a value or ``HttpError``.
* ``sse``: ``EventStreamParser`` on the input, and ``parse_last_event_id`` on it as text: never an exception.
* ``binproto``: ``FrameDecoder`` whole and cut: frames or ``FrameError``, the same for both cuts.

A finding is not fatal: its signature (exception type and the line that raised it) and the first input that raised
it are recorded, and the run goes on until ``--seconds``; the summary lists the distinct findings. Each one belongs in
tests/test_fuzz.py as a regression test.

    .venv/bin/python scripts/fuzz_atheris.py http --seconds 120
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "tests")]

with atheris.instrument_imports():
    from binproto import FrameDecoder, FrameError
    from iokit.http.errors import HttpError
    from iokit.http.messages import END_OF_MESSAGE, BodyChunk, RequestHead
    from iokit.patterns.sse import EventStreamParser, parse_last_event_id
    from iokit.tus import protocol
from test_http_parser import parse  # feeds reads, merges body chunks: the property tests' view of the events

CORE_STATUSES = {400, 405, 413, 414, 431, 501, 505}


class PromiseBroken(AssertionError):
    """A target's promise did not hold (as opposed to an exception escaping the code under test)."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise PromiseBroken(message)


def cut_point(data: bytes) -> tuple[int, bytes]:
    """Take the first two bytes as where to cut the rest in two."""
    if len(data) < 2:
        return 0, data
    rest = data[2:]
    return int.from_bytes(data[:2], "big") % (len(rest) + 1), rest


# --- targets ----------------------------------------------------------------------------------------------------------

def http_events(reads: list[bytes]) -> list:
    events = parse(reads)
    for index, event in enumerate(events):
        require(isinstance(event, (RequestHead, BodyChunk)) or event is END_OF_MESSAGE
                or (isinstance(event, HttpError) and index == len(events) - 1 and event.close
                    and event.status in CORE_STATUSES), f"unexpected event {event!r} at {index}")
    return events


def fuzz_http(data: bytes) -> None:
    cut, wire = cut_point(data)
    whole = http_events([wire])
    split = http_events([wire[:cut], wire[cut:]])
    if whole != split:
        documented = (whole and len(whole) == len(split) and isinstance(whole[-1], HttpError)
                      and {whole[-1].status, split[-1].status} <= {400, 405} and whole[:-1] == split[:-1])
        require(bool(documented), f"events depend on the split: {whole!r} vs {split!r}")


TUS_PARSERS = (
    lambda text: protocol.parse_concat(text),
    lambda text: protocol.parse_metadata(text, 4096),
    lambda text: protocol.parse_checksum(text),
    lambda text: protocol.parse_upload_offset(text),
    lambda text: protocol.parse_upload_length(text, 1 << 40),
    lambda text: protocol.check_tus_resumable(text),
    lambda text: protocol.check_patch_content_type(text),
)


def fuzz_tus(data: bytes) -> None:
    if not data:
        return
    parse = TUS_PARSERS[data[0] % len(TUS_PARSERS)]
    try:
        result = parse(data[1:].decode("latin-1"))
    except HttpError as error:
        require(error.status in (400, 412, 413, 415), f"status {error.status}")
        return
    if isinstance(result, protocol.Concat):
        require(all(protocol.is_upload_id(part) for part in result.part_ids), f"foreign id in {result!r}")


def fuzz_sse(data: bytes) -> None:
    list(EventStreamParser().feed(data))
    parsed = parse_last_event_id(data.decode("latin-1"))
    require(parsed is None or parsed >= -1, f"last event id {parsed!r}")


def binproto_outcome(reads: list[bytes]) -> tuple[list, int | None]:
    decoder = FrameDecoder(4096)
    frames = []
    for piece in reads:
        decoder.feed(piece)
        try:
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
        except FrameError as error:
            return frames, error.code
    return frames, None


def fuzz_binproto(data: bytes) -> None:
    cut, wire = cut_point(data)
    require(binproto_outcome([wire]) == binproto_outcome([wire[:cut], wire[cut:]]), "outcome depends on the split")


TARGETS = {"http": fuzz_http, "tus": fuzz_tus, "sse": fuzz_sse, "binproto": fuzz_binproto}
# The grammar's words, as libFuzzer dictionaries: mutations that splice them in reach deeper branches much sooner.
DICTIONARIES = {
    "http": [b"GET ", b"POST ", b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", b"Host: a\r\n", b"Content-Length: ",
             b"Transfer-Encoding: chunked\r\n", b"Expect: 100-continue\r\n", b"Connection: upgrade\r\n",
             b"Upgrade: x\r\n", b"\r\n\r\n", b"0\r\n\r\n", b"PRI * HTTP/2.0"],
    "tus": [b"final;", b"partial", b"http://", b"//", b"[", b"]", b"/files/", b"0123456789abcdef0123456789abcdef",
            b"sha1 ", b"md5 ", b"1.0.0", b"application/offset+octet-stream", b"=="],
    "sse": [b"data: ", b"id: ", b"event: ", b"retry: ", b"\r\n", b"\n\n", b":"],
    "binproto": [b"\x00\x00\x00\x08\x01", b"\x00\x00\x00\x0c\x01\x03", b"\x01\x02\x00\x00"],
}


def dictionary_file(target: str) -> str:
    """Write ``target``'s dictionary in libFuzzer's format to a file in the temporary folder; return its path."""
    path = Path(tempfile.gettempdir()) / f"iokit-fuzz-{target}.dict"
    path.write_text("".join('"' + "".join(f"\\x{byte:02x}" for byte in word) + '"\n' for word in DICTIONARIES[target]))
    return str(path)


# --- running ----------------------------------------------------------------------------------------------------------

class Findings:
    """Distinct failures seen so far (by signature), with the first input of each; and how many inputs were run."""

    def __init__(self, seconds: float, report) -> None:
        self.by_signature: dict[str, bytes] = {}  # one per (type, raising line): the message repeats the input
        self.inputs = 0
        self._deadline = time.monotonic() + seconds
        self._report = report

    def guard(self, target):
        def one_input(data: bytes) -> None:
            self.inputs += 1
            if self.inputs % 1024 == 0 and time.monotonic() > self._deadline:
                # libFuzzer's own -max_total_time leaves with C exit(): no Python atexit runs, so we stop ourselves.
                self._report()
                os._exit(0)
            try:
                target(data)
            except Exception as error:  # noqa: BLE001 - every escape is a finding
                where = traceback.extract_tb(error.__traceback__)[-1]
                signature = f"{type(error).__name__} at {Path(where.filename).name}:{where.lineno}: {str(error)[:60]}"
                if not any(known.split(": ")[0] == signature.split(": ")[0] for known in self.by_signature):
                    self.by_signature[signature] = data
                    print(f"\nFINDING {signature!r} input={data[:200]!r}", file=sys.stderr, flush=True)
        return one_input


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--seconds", type=int, default=120, help="how long to fuzz (default: 120)")
    parser.add_argument("--json", help="write the summary to this file")
    arguments, libfuzzer_arguments = parser.parse_known_args()
    started = time.monotonic()

    def report() -> None:
        summary = {"target": arguments.target, "seconds": round(time.monotonic() - started, 1),
                   "inputs": findings.inputs, "findings": {signature: data.hex() for signature, data
                                                             in findings.by_signature.items()}}
        print(json.dumps(summary, indent=1), flush=True)
        if arguments.json:
            Path(arguments.json).write_text(json.dumps(summary, indent=1) + "\n")

    findings = Findings(arguments.seconds, report)
    atheris.Setup([sys.argv[0], f"-max_total_time={arguments.seconds + 60}",
                   f"-dict={dictionary_file(arguments.target)}", *libfuzzer_arguments],
                  findings.guard(TARGETS[arguments.target]))
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
