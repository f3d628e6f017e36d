"""The status socket: a root-only UNIX socket that answers one JSON line per connection.

Protocol (systemd-oomd's `oomctl dump` idea, over a socket): the client sends one line
`{"cmd": "status"}` (or `{"cmd": "ping"}`), the server answers one JSON line and closes.
"status" answers with the daemon's `status()` dict; "ping" with `{"pong": true, "pid": N}`;
anything else with `{"error": "..."}`.

Safety, in layers: the socket is created under umask 077 in a directory made 0700 when
it does not exist, and is mode 0600; on top of that every connection's peer credentials
(SO_PEERCRED) are checked, and any uid other than root (or the daemon's own) is answered
`{"error": "permission denied: root only"}`, even if the file's mode was loosened.

The socket's directory must be one only root can change (trust.resolve: every
component root's, no symlink of another user on the way), on the server's side and on
the client's, and the client also checks that the process serving the socket is root
(SO_PEERCRED, its side): otherwise another user could serve a fake daemon to root's
`mreaper status`.  The client escapes whatever it prints (cli_status).

Liveness: one thread serves every connection from a selector loop, never blocking on a
client: a request is at most MAX_REQUEST bytes, each connection has a deadline, and at
most MAX_CLIENTS are open at once.  Connections are bounded per peer (SO_PEERCRED): a
uid that is refused anyway holds at most PEER_LIMIT of them, and all such uids together
at most a quarter of the slots; more are closed at once.  A new connection from an
allowed uid takes the slot of the oldest refused one first, and allowed clients are
served first in each round: a flood by another user on a loosened socket does not keep
root out.  A client that connects and sends nothing costs one slot until its deadline,
never the daemon's loop.  The provider runs in this thread, so it must be cheap
(Daemon.status reads cached state).
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

from mreaper.linux import trust
from mreaper.reap import fmt_bytes

log = logging.getLogger("mreaper")

MAX_REQUEST = 4096          # bytes: a request is one short line
MAX_RESPONSE = 16 << 20     # bytes the client accepts
CLIENT_TIMEOUT = 2.0        # seconds a connection may take, from accept to the last byte
MAX_CLIENTS = 16            # connections served at once
PEER_LIMIT = 2              # connections open at once from one uid that is refused anyway
ACCEPTS_PER_ROUND = 64      # accepts before the open clients get their turn
BACKLOG = 64                # connections the kernel queues before we accept them
DENIED = "permission denied: root only"

Provider = Callable[[], Mapping[str, Any]]


class StatusError(Exception):
    """The status socket could not be queried or answered nonsense."""


class NoDaemon(StatusError):
    """Nobody serves at the path: no socket file, or a stale one (connection refused)."""


class QueryDenied(StatusError):
    """The socket exists but we may not use it (its mode, or the server refused us)."""


class UntrustedServer(StatusError):
    """The socket's path or the process serving it is not root's: not asked (or its
    answer not read)."""


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
    allowed: bool = False
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
            trusted_directory(directory, create=True)
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
    def _order(self, ready: list[tuple[selectors.SelectorKey, int]],
               clients: dict[int, _Client]) -> list[tuple[selectors.SelectorKey, int]]:
        """New connections first (root's may be among them), then allowed clients, then
        the rest: under a flood, root is answered first."""
        def rank(item: tuple[selectors.SelectorKey, int]) -> int:
            key = item[0]
            if key.fileobj is self._sock or key.fileobj == self._wake_r:
                return 0
            client = clients.get(key.fd)
            return 1 if client is not None and client.allowed else 2
        return sorted(ready, key=rank)

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
                for key, events in self._order(sel.select(max(0.0, wait)), clients):
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
        """Accept the queued connections (at most ACCEPTS_PER_ROUND), each within the
        bounds per peer: see the module's docstring."""
        assert self._sock is not None
        for _ in range(ACCEPTS_PER_ROUND):
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
            allowed = uid in self.allowed_uids
            if not allowed:
                refused = [c for c in clients.values() if not c.allowed]
                if (sum(c.uid == uid for c in refused) >= PEER_LIMIT
                        or len(refused) >= max(1, self.max_clients // 4)):
                    self.refused += 1  # it would be refused anyway: no slot for it
                    conn.close()
                    continue
            if len(clients) >= self.max_clients:
                # the oldest refused connection goes first; an allowed one only for
                # another allowed one
                pool = [c for c in clients.values() if not c.allowed] or (
                    list(clients.values()) if allowed else [])
                if not pool:
                    self.refused += 1
                    conn.close()
                    continue
                self._drop(sel, clients, min(pool, key=lambda c: c.deadline))
            clients[conn.fileno()] = _Client(conn, time.monotonic() + self.timeout, uid,
                                             allowed=allowed)
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
        if not client.allowed:
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


def trusted_directory(directory: str, *, create: bool = False) -> str:
    """The socket's directory, checked (trust.resolve): every component owned by root
    (or by us) and not writable by others, the directory itself not even when sticky.
    With `create`, a missing directory is made 0700, under an ancestor checked first.
    Raises OSError (Untrusted as EPERM, with the reason)."""
    try:
        if create and not os.path.lexists(directory):
            ancestor = directory
            while not os.path.lexists(ancestor):
                ancestor = os.path.dirname(ancestor)
            trust.resolve(ancestor, final_sticky_ok=True)
            os.makedirs(directory, mode=0o700, exist_ok=True)
        resolved = trust.resolve(directory)
    except trust.Untrusted as e:
        raise PermissionError(errno.EPERM, e.reason(directory), directory) from None
    if not stat.S_ISDIR(resolved.st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), directory)
    return resolved.path


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


def _check_socket_path(path: str) -> None:
    """Refuse a socket another user could have put there: its directory must pass
    trusted_directory and the socket file be root's (or ours).  A socket's mode only
    says who may connect, so a loosened 0666 socket of root's is still root's."""
    try:
        # joined, not normalized: a ".." after a symlink is the kernel's to resolve
        trusted_directory(os.path.dirname(os.path.join(os.getcwd(), path)))
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise NoDaemon(e.strerror or str(e)) from None
    except PermissionError as e:
        if e.errno == errno.EPERM:  # Untrusted
            raise UntrustedServer(e.strerror or str(e)) from None
        raise QueryDenied(f"{e.strerror} (the status socket is root only)") from None
    except OSError as e:
        raise StatusError(e.strerror or str(e)) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise NoDaemon(f"{path} is {trust.describe_type(st.st_mode)}, not a socket")
    if st.st_uid not in trust.trusted_uids():
        raise UntrustedServer(f"refused: the socket {path} is owned by uid {st.st_uid}, "
                              "not root")


def query(path: str, timeout: float = CLIENT_TIMEOUT, cmd: str = "status") -> dict[str, Any]:
    """Ask the server at `path`; its answer as a dict (which may hold "error").

    Raises NoDaemon when nobody serves there, QueryDenied when the socket's mode keeps
    us out, UntrustedServer when another user controls the socket's path or serves it,
    StatusError on a timeout or a malformed answer.
    """
    _check_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                sock.connect(path)
                _, uid, _ = peer_credentials(sock)
                if uid not in trust.trusted_uids():
                    raise UntrustedServer(f"the server at {path} runs as uid {uid}, not root")
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
