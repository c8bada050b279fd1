"""The command line every example server shares: ``--backend --host --port --workers ...``, one flag per limit, and
usage errors in one line (exit 2)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from typing import Any, Callable

LOG_LEVELS = ("debug", "info", "warning", "error")


class UsageError(Exception):
    """A flag the server cannot run with, found after parsing (a port in use, a host that cannot be bound): ``main``
    says it in one line and exits 2, as for a flag argparse refused."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error told in one line: the usage of a server with thirty limits is a screenful, and the
    line that matters would scroll away."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 0 to 65535, not {text!r}")
    return int(text)


def _number_type(value_type: type) -> Callable[[str], Any]:
    """Return an argparse type for a limit or a duration: ``value_type`` (int or float), not negative, not NaN. Zero
    passes here; the limits dataclasses refuse it where it makes no sense."""
    def parse(text: str):
        try:
            value = value_type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if value_type is int else 'a number'}, "
                                             f"not {text!r}") from None
        if value != value or value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative, not {text!r}")
        return value
    parse.__name__ = value_type.__name__  # argparse names the type in its messages
    return parse


def argument_parser(description: str, *limits_types: type) -> argparse.ArgumentParser:
    """Return a parser with the flags every example server takes, and a flag for each field of each ``limits_types``
    (``add_limit_arguments``); an example adds its own, then calls ``main``."""
    parser = _ArgumentParser(description=description)
    parser.add_argument("--backend", default="auto", choices=["blocking", "threads", "epoll", "uring", "auto"],
                        help="the I/O backend (default: auto, which prefers uring and says why it fell back)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="numeric address to listen on, IPv4 or IPv6 (default: 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000,
                        help="port to listen on, 0 to 65535; 0 picks a free one (default: 8000)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes sharing the port with SO_REUSEPORT (default: 1; servers that keep their state "
                             "in one process refuse more)")
    parser.add_argument("--reuse-port", action="store_true",
                        help="set SO_REUSEPORT on the listening socket, to share the port with other processes "
                             "(refused where --workers is)")
    parser.add_argument("--shutdown-grace", type=_number_type(float), default=5.0,
                        help="seconds requests in progress get to finish on SIGTERM/SIGINT (default: 5)")
    parser.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                        help="what the server logs to stderr (default: warning; info adds connections cut off)")
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)  # set by the worker parent
    for limits_type in limits_types:
        add_limit_arguments(parser, limits_type)
    return parser


def add_limit_arguments(parser: argparse.ArgumentParser, limits_type: type) -> None:
    """Add one flag per field of the frozen dataclass ``limits_type`` (``max_body_bytes`` -> ``--max-body-bytes``),
    under the parser's one ``limits`` heading, each with the field's description and unit."""
    group = getattr(parser, "_iokit_limits_group", None)
    if group is None:
        group = parser._iokit_limits_group = parser.add_argument_group(
            "limits", "what the server bounds, and the status a client gets past each bound")
    descriptions = field_descriptions(limits_type)
    for field in dataclasses.fields(limits_type):
        default = field.default
        value_type = type(default) if default is not None else float
        unit = limit_unit(field.name, value_type)
        shown_default = f"{default:g}" if isinstance(default, float) else f"{default}"
        text = descriptions.get(field.name, "").replace("%", "%%")
        group.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=_number_type(value_type),
                           default=default, metavar=unit.upper().replace(" ", "_") if unit else "N",
                           help=f"{text} (default: {shown_default}{' ' + unit if unit else ''})")


def limit_unit(name: str, value_type: type) -> str:
    """Return the unit of a limit, from the naming rule the limits dataclasses follow (sizes in bytes, times in
    seconds), or ``""`` for a count."""
    for suffix, unit in (("_bytes", "bytes"), ("_size", "bytes"), ("_ms", "milliseconds"), ("_chars", "characters"),
                         ("_jitter", "fraction")):
        if name.endswith(suffix):
            return unit
    return "seconds" if value_type is float else ""


def field_descriptions(limits_type: type) -> dict[str, str]:
    """Return each field's description: the string literal under it in the class body (what the source says; Python
    keeps no such attribute docstrings at run time), on one line."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(limits_type)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body
    found = {}
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            found[statement.target.id] = " ".join(following.value.value.split()).replace("``", "")
    return found


def limits_from_arguments(arguments: argparse.Namespace, limits_type: type):
    """Return a ``limits_type`` built from the flags ``add_limit_arguments`` added."""
    return limits_type(**{field.name: getattr(arguments, field.name) for field in dataclasses.fields(limits_type)})


def format_address(host: str, port: int) -> str:
    """Return ``host:port`` as a URL writes it: an IPv6 address in brackets (``[::1]:8000``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
