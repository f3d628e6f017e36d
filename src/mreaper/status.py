"""The status socket: a root-only UNIX socket that answers one JSON line per connection.

Protocol (systemd-oomd's `oomctl dump` idea, over a socket): the client sends one line
`{"cmd": "status"}` (or `{"cmd": "ping"}`), the server answers one JSON line and closes.
"status" answers with the daemon's `status()` dict; "ping" with `{"pong": true, "pid": N}`;
anything else with `{"error": "..."}`.

Safety, in layers: the socket is created under umask 077 in a directory made 0700 when
it does not exist, and is mode 0600; on top of that every connection's peer credentials
(SO_PEERCRED) are checked, and any uid other than root (or the daemon's own) is answered
`{"error": "permission denied: root only"}`, even if the file's mode was loosened.

Liveness: one thread serves every connection from a selector loop, never blocking on a
client: a request is at most MAX_REQUEST bytes, each connection has a deadline, and at
most MAX_CLIENTS are open at once (the oldest is dropped for a new one).  A client that
connects and sends nothing costs one slot until its deadline, never the daemon's loop.
The provider runs in this thread, so it must be cheap (Daemon.status reads cached state).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from mreaper.reap import fmt_bytes

log = logging.getLogger("mreaper")

MAX_REQUEST = 4096          # bytes: a request is one short line
MAX_RESPONSE = 16 << 20     # bytes the client accepts
CLIENT_TIMEOUT = 2.0        # seconds a connection may take, from accept to the last byte
MAX_CLIENTS = 16            # connections served at once
BACKLOG = 64                # connections the kernel queues before we accept them
DENIED = "permission denied: root only"

Provider = Callable[[], Mapping[str, Any]]


class StatusError(Exception):
    """The status socket could not be queried or answered nonsense."""


class NoDaemon(StatusError):
    """Nobody serves at the path: no socket file, or a stale one (connection refused)."""


class QueryDenied(StatusError):
    """The socket exists but we may not use it (its mode, or the server refused us)."""


# --- the server -------------------------------------------------------------------------


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected UNIX socket, as the
    kernel recorded them at connect() (SO_PEERCRED): the client cannot forge them."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", data)
    return pid, uid, gid


@dataclass
class _Client:
    sock: socket.socket
    deadline: float
    uid: int
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytes = b""
    answered: bool = False


def _dumps(obj: object) -> bytes:
    return (json.dumps(obj, default=str, separators=(",", ":")) + "\n").encode()


class StatusServer:
    """Serve `provider()` on a UNIX stream socket at `path`, from a thread of its own."""

    def __init__(self, path: str, provider: Provider, *,
                 allowed_uids: Collection[int] | None = None,
                 timeout: float = CLIENT_TIMEOUT, max_clients: int = MAX_CLIENTS) -> None:
        if not os.path.isabs(path):
            raise ValueError(f"status socket {path!r}: must be an absolute path")
        self.path = path
        self.provider = provider
        # Root, and the uid the daemon runs as (a dry-run daemon of an ordinary user can
        # show its own state to that user, who could ptrace it anyway).
        self.allowed_uids = frozenset(allowed_uids if allowed_uids is not None
                                      else {0, os.geteuid()})
        self.timeout = timeout
        self.max_clients = max_clients
        self.served = 0
        self.refused = 0
        self._sock: socket.socket | None = None
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._stop = False

    # -- lifecycle
    def start(self) -> StatusServer:
        """Create the socket (replacing a stale one) and start serving.  Raises OSError
        when the socket cannot be created or another server answers at the path."""
        self._sock = self._bind()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="mreaper-status", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and remove the socket file (only if it is still ours).  Idempotent."""
        self._stop = True
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            with contextlib.suppress(OSError):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._ident:
                    os.unlink(self.path)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> StatusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _bind(self) -> socket.socket:
        directory = os.path.dirname(self.path)
        old_umask = os.umask(0o077)
        try:
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o700, exist_ok=True)
            self._remove_stale()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind(self.path)
                os.chmod(self.path, 0o600)  # whatever the umask did, 0600
                st = os.lstat(self.path)
                self._ident = (st.st_dev, st.st_ino)
                sock.listen(BACKLOG)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
        finally:
            os.umask(old_umask)
        return sock

    def _remove_stale(self) -> None:
        """A socket file nobody answers on (a previous daemon died) is removed; a live
        server, or a file that is not a socket, is left alone and is an error."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return
        except OSError:
            pass  # e.g. a timeout: something holds it; refuse below
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, f"another server answers at {self.path}")

    # -- the loop
    def _serve(self) -> None:
        assert self._sock is not None
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        clients: dict[int, _Client] = {}
        try:
            while not self._stop:
                now = time.monotonic()
                wait = min((c.deadline for c in clients.values()), default=now + 60) - now
                for key, events in sel.select(max(0.0, wait)):
                    if key.fileobj is self._sock:
                        self._accept(sel, clients)
                    elif key.fileobj == self._wake_r:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 64)
                    else:
                        client = clients.get(key.fd)
                        if client is not None:
                            self._step(sel, clients, client, events)
                now = time.monotonic()
                for client in [c for c in clients.values() if c.deadline <= now]:
                    if not client.answered:  # best effort, never blocking
                        with contextlib.suppress(OSError):
                            client.sock.send(_dumps(
                                {"error": f"no complete request within {self.timeout:g} s"}))
                    self._drop(sel, clients, client)
        except Exception:  # the status server must never take the daemon down
            log.exception("status server failed; %s no longer answers", self.path)
        finally:
            for client in list(clients.values()):
                self._drop(sel, clients, client)
            sel.close()

    def _accept(self, sel: selectors.BaseSelector, clients: dict[int, _Client]) -> None:
        """Accept every queued connection; beyond max_clients the oldest open one goes."""
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:  # EMFILE and the like: back off a little, keep serving
                log.warning("status socket: accept failed: %s", e.strerror)
                time.sleep(0.05)
                return
            conn.setblocking(False)
            try:
                _, uid, _ = peer_credentials(conn)
            except OSError:
                conn.close()
                continue
            if len(clients) >= self.max_clients:
                self._drop(sel, clients, min(clients.values(), key=lambda c: c.deadline))
            clients[conn.fileno()] = _Client(conn, time.monotonic() + self.timeout, uid)
            sel.register(conn, selectors.EVENT_READ, None)

    def _step(self, sel: selectors.BaseSelector, clients: dict[int, _Client], client: _Client,
              events: int) -> None:
        if events & selectors.EVENT_READ and not client.answered:
            try:
                data = client.sock.recv(MAX_REQUEST + 1 - len(client.inbuf))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(sel, clients, client)
                return
            client.inbuf += data
            if b"\n" in client.inbuf or not data or len(client.inbuf) > MAX_REQUEST:
                self._answer(sel, client, eof=not data)
        if events & selectors.EVENT_WRITE or client.answered:
            self._flush(sel, clients, client)

    def _answer(self, sel: selectors.BaseSelector, client: _Client, *, eof: bool) -> None:
        client.answered = True
        line, newline, _ = bytes(client.inbuf).partition(b"\n")
        if client.uid not in self.allowed_uids:
            self.refused += 1
            reply: Mapping[str, Any] = {"error": DENIED}
        elif not newline and len(client.inbuf) > MAX_REQUEST:
            reply = {"error": f"request longer than {MAX_REQUEST} bytes"}
        elif not newline and not line.strip() and eof:
            reply = {"error": 'empty request: send one line, e.g. {"cmd": "status"}'}
        else:
            reply = self._dispatch(line)
        try:
            client.outbuf = _dumps(reply)
        except (TypeError, ValueError) as e:
            client.outbuf = _dumps({"error": f"status could not be encoded: {e}"})
        sel.modify(client.sock, selectors.EVENT_WRITE, None)

    def _dispatch(self, line: bytes) -> Mapping[str, Any]:
        try:
            request = json.loads(line)
        except ValueError as e:
            return {"error": f"bad request: not JSON ({e})"}
        cmd = request.get("cmd") if isinstance(request, dict) else None
        if cmd == "ping":
            return {"pong": True, "pid": os.getpid()}
        if cmd == "status":
            try:
                answer = self.provider()
            except Exception as e:
                log.exception("status provider failed")
                return {"error": f"status failed: {type(e).__name__}: {e}"}
            self.served += 1
            return answer
        return {"error": f"unknown command {cmd!r}; known: \"status\", \"ping\""}

    def _flush(self, sel: selectors.BaseSelector, clients: dict[int, _Client],
               client: _Client) -> None:
        try:
            sent = client.sock.send(client.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(sel, clients, client)
            return
        client.outbuf = client.outbuf[sent:]
        if not client.outbuf:
            self._drop(sel, clients, client)

    @staticmethod
    def _drop(sel: selectors.BaseSelector, clients: dict[int, _Client], client: _Client) -> None:
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(client.sock)
        clients.pop(client.sock.fileno(), None)
        client.sock.close()


def serve(path: str, provider: Provider) -> StatusServer | None:
    """Start a status server at `path` for the daemon, or return None when `path` is ""
    (off) or the socket cannot be made (logged: the daemon runs on without it)."""
    if not path:
        return None
    try:
        server = StatusServer(path, provider).start()
    except (OSError, ValueError) as e:
        log.warning("status socket %s unavailable: %s", path, getattr(e, "strerror", None) or e)
        return None
    log.info("status on %s (root only)", path)
    return server


def summary(st: Mapping[str, Any]) -> str:
    """One line from a status dict, for systemd's STATUS= (`systemctl status`): each
    scope's state and figure, and the kills so far."""
    parts = []
    for scope in st.get("scopes") or []:
        if not isinstance(scope, Mapping):
            continue
        severity = str(scope.get("severity", "?"))
        state = "ok" if severity == "none" else severity.upper()
        if "mem_available" in scope:
            figure = f"MemAvailable {fmt_bytes(scope.get('mem_available'))}"
        else:
            figure = f"headroom {fmt_bytes(scope.get('headroom'))}"
        parts.append(f"{scope.get('scope', '?')} {state}, {figure}")
    kills = [k for k in st.get("kills") or [] if isinstance(k, Mapping)]
    if kills:
        last = kills[-1]
        who = (f"cgroup {last.get('cgroup')}" if "members" in last
               else f"{last.get('pid')} {last.get('name')!r} {last.get('mrelease', '')}")
        parts.append(f"{len(kills)} kills, last {who}")
    else:
        parts.append("no kills")
    return "; ".join(parts)


# --- the client -------------------------------------------------------------------------


def query(path: str, timeout: float = CLIENT_TIMEOUT, cmd: str = "status") -> dict[str, Any]:
    """Ask the server at `path`; its answer as a dict (which may hold "error").

    Raises NoDaemon when nobody serves there, QueryDenied when the socket's mode keeps
    us out, StatusError on a timeout or a malformed answer.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
                raise NoDaemon(f"{e.strerror}") from None
            except PermissionError as e:
                raise QueryDenied(f"{e.strerror} (the status socket is root only)") from None
            except BlockingIOError:  # the server's backlog is full: it is busy, not gone
                if time.monotonic() >= deadline:
                    raise TimeoutError from None
                time.sleep(0.01)
        sock.sendall(_dumps({"cmd": cmd}))
        buf = bytearray()
        while b"\n" not in buf:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break  # the server closed with our request unread: what it sent still counts
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_RESPONSE:
                raise StatusError(f"answer longer than {MAX_RESPONSE} bytes")
    except TimeoutError:
        raise StatusError(f"no answer within {timeout:g} s") from None
    except OSError as e:
        raise StatusError(e.strerror or str(e)) from None
    finally:
        sock.close()
    line = bytes(buf).partition(b"\n")[0]
    if not line:
        raise StatusError("the server closed without answering")
    try:
        answer = json.loads(line)
    except ValueError as e:
        raise StatusError(f"answer is not JSON: {e}") from None
    if not isinstance(answer, dict):
        raise StatusError(f"answer is not a JSON object: {line[:80]!r}")
    return answer
