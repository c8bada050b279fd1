"""An asyncio ``Transport`` whose connection the native engine drives: the hot path stays in C.

``engine.attach_protocol`` takes a socket and calls a protocol's callbacks from C (one ``bytes`` and one call of the
cached ``data_received`` per chunk received; ``write`` queues into the engine's send queue, flushed once per turn).
asyncio's users expect a little more than the C ``Transport`` has, and the difference lives here:

* **A real ``asyncio.Transport``** (``isinstance`` checks, ``get_extra_info("socket")``, ``set_protocol``). The
  methods a protocol calls per message (``write``, ``writelines``, ``get_write_buffer_size``...) are the C
  transport's bound methods stored on the instance, so ``transport.write(data)`` is one C call, no Python frame.
* **The protocol can be switched** (``set_protocol``: ``start_tls``, uvicorn's websocket upgrade, the sendfile
  fallback). The engine caches the callable it calls per chunk when the connection is attached; we hand it a
  ``functools.partial`` around the protocol's ``data_received`` and re-point that partial in place
  (``partial.__setstate__``) when the protocol changes. A partial with no bound arguments calls through in C, so the
  per-chunk cost is one C indirection. Buffered protocols (``get_buffer``/``buffer_updated``, e.g. asyncio's
  ``SSLProtocol``) are fed through asyncio's own helper.
* **``connection_lost`` comes from the loop** (``call_soon``), never from inside ``close()``/``abort()`` (the engine
  may close the fd right there), as asyncio's selector transports do; the server's connection count follows it.
"""

from __future__ import annotations

import functools
import socket
from asyncio import base_events, constants, futures, protocols, transports

_STREAM_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6, socket.AF_UNIX})
# The C transport's methods a protocol may call per message: bound onto the Python transport's instance.
_C_METHODS = ("write", "writelines", "write_eof", "can_write_eof", "is_closing", "pause_reading", "resume_reading",
              "is_reading", "get_write_buffer_size", "get_write_buffer_limits", "set_write_buffer_limits")


def engine_can_drive(sock: socket.socket) -> bool:
    """True for the sockets the engine drives: TCP over IPv4/IPv6 and Unix stream sockets."""
    return sock.type == socket.SOCK_STREAM and sock.family in _STREAM_FAMILIES


def _data_callable(protocol):
    """What the engine should call per chunk for ``protocol``: its ``data_received``, or, for a buffered protocol,
    asyncio's copy into ``get_buffer()`` followed by ``buffer_updated()``."""
    if isinstance(protocol, protocols.BufferedProtocol):
        return functools.partial(protocols._feed_data_to_buffered_proto, protocol)
    return protocol.data_received


class PseudoSocket:
    """What ``get_extra_info("socket")`` gives for an engine transport (uvloop does the same): the socket's options,
    addresses and number, but not its I/O or its life, which belong to the engine (``close``, ``recv``, ``send``...
    raise ``TypeError``). Once the connection is lost, ``fileno()`` is -1 and the other calls raise ``OSError``."""

    _FORWARDED = frozenset({"getsockopt", "setsockopt", "getsockname", "getpeername", "fileno", "gettimeout",
                            "family", "type", "proto"})

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def __getattr__(self, name: str):
        if name in self._FORWARDED:
            return getattr(self._sock, name)
        raise TypeError(f"{name}() is not allowed on the socket of an iokit.asyncio transport: the native engine owns "
                        f"its I/O and its life; use the transport")

    def _lost(self) -> None:
        self._sock.detach()  # the engine closed the fd already: never close that number again

    def __repr__(self) -> str:
        return f"<iokit.asyncio.PseudoSocket fd={self._sock.fileno()} family={self._sock.family!r}>"


class EngineTransport(transports._FlowControlMixin):  # the mixin: what loop.sendfile()'s fallback checks for
    """A connection driven by the native engine (made by the loop's ``_make_socket_transport``)."""

    _sendfile_compatible = constants._SendfileMode.FALLBACK  # loop.sendfile() writes the file through us
    _start_tls_compatible = True  # loop.start_tls() puts its SSLProtocol on us with set_protocol()

    def __init__(self, loop, engine, sock: socket.socket, protocol, waiter=None, extra=None, server=None) -> None:
        base_events._set_nodelay(sock)  # as asyncio's socket transport: small writes leave at once
        info = dict(extra or {})
        info.setdefault("sockname", sock.getsockname())
        if "peername" not in info:
            try:
                info["peername"] = sock.getpeername()
            except OSError:
                info["peername"] = None
        super().__init__(info, loop)  # its write-limit methods are replaced by the C transport's in _made()
        self._protocol = protocol
        self._protocol_paused = False  # pause_writing() was called and resume_writing() not yet
        self._server = server
        self._lost = False
        self._ctransport = None
        self._data_received = functools.partial(_data_callable(protocol))
        family, kind, proto = sock.family, sock.type, sock.proto
        fd = sock.detach()
        self._socket = PseudoSocket(socket.socket(family, kind, proto, fileno=fd))
        self._extra["socket"] = self._socket
        if server is not None:
            server._attach()
        loop._transports[fd] = self
        # connection_made runs in here (below, in _made), before the engine reads anything from the socket.
        engine.attach_protocol(fd, _Relay(self), None)
        if waiter is not None:
            loop.call_soon(futures._set_result_unless_cancelled, waiter, None)

    def _made(self, ctransport) -> None:
        self._ctransport = ctransport
        for name in _C_METHODS:
            setattr(self, name, getattr(ctransport, name))
        self._protocol.connection_made(self)

    def _connection_lost(self, exc: BaseException | None) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._protocol = None
            server, self._server = self._server, None
            if server is not None:
                server._detach()

    # --- what is not per message --------------------------------------------------------------------------------

    # A close (or abort) that must wait for the engine finishes in a later flush, which calls connection_lost; the
    # engine's wait does not block after a flush that called a protocol, so what that schedules runs at once.
    def close(self) -> None:
        if self._ctransport is not None:
            self._ctransport.close()

    def abort(self) -> None:
        if self._ctransport is not None:
            self._ctransport.abort()

    def get_protocol(self):
        return self._protocol

    def set_protocol(self, protocol) -> None:
        self._protocol = protocol
        # Re-point the callable the engine cached, in place (see the module docstring).
        self._data_received.__setstate__((_data_callable(protocol), (), None, None))

    def fileno(self) -> int:
        return -1 if self._lost else self._socket.fileno()

    def __repr__(self) -> str:
        state = "closed" if self._lost else ("closing" if self._ctransport and self.is_closing() else "open")
        return f"<iokit.asyncio.EngineTransport fd={self.fileno()} {state}>"


class _Relay:
    """The protocol the engine sees: it calls the transport's current protocol (``set_protocol`` may change it)."""

    __slots__ = ("transport", "data_received")

    def __init__(self, transport: EngineTransport) -> None:
        self.transport = transport
        self.data_received = transport._data_received  # the engine caches this once: the switchable partial

    def connection_made(self, ctransport) -> None:
        self.transport._made(ctransport)

    def eof_received(self):
        return self.transport._protocol.eof_received()

    def pause_writing(self) -> None:
        transport = self.transport
        transport._protocol_paused = True
        transport._protocol.pause_writing()

    def resume_writing(self) -> None:
        transport = self.transport
        transport._protocol_paused = False
        transport._protocol.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        # The engine has closed the fd just now.
        transport = self.transport
        transport._lost = True
        transport._socket._lost()
        loop = transport._loop
        if loop.is_closed():  # the loop's close() ended the engine, and with it this connection
            transport._connection_lost(exc)
        else:
            loop.call_soon(transport._connection_lost, exc)
