"""One `mreaper run` at a time: an flock(2) on a lock file that names its holder's PID.

Two killers on one machine act twice on one shortage (two victims where one was
enough).  flock is released by the kernel when its holder dies, however it dies, so a
lock file left behind by a crash is no obstacle: only a living holder is.  The file is
opened without following a symlink, in a directory only root or we can write, and must
be ours: another user cannot plant it to keep the daemon from starting unnoticed, nor
point it at a file of ours to have us truncate it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

from mreaper.linux import trust

DEFAULT = "/run/mreaper/mreaper.lock"  # next to the status socket; systemd's RuntimeDirectory
ENV = "MREAPER_LOCK_FILE"              # overrides the default (tests, a second test machine)


class InstanceError(Exception):
    """The lock cannot be taken safely (its path, owner or mode is wrong)."""


class AlreadyRunning(InstanceError):
    """Another living process holds the lock."""

    def __init__(self, path: str, pid: int | None) -> None:
        self.path, self.pid = path, pid
        who = f"PID {pid}" if pid is not None else "PID unknown"
        super().__init__(f"another mreaper runs ({who}, lock {path})")


def default_path() -> str:
    """$MREAPER_LOCK_FILE, else /run/mreaper/mreaper.lock as root, else the user's own
    runtime directory ($XDG_RUNTIME_DIR, only if it is ours), else /tmp/mreaper-UID.lock
    (a sticky /tmp: nobody else can replace our file there)."""
    if env := os.environ.get(ENV):
        return env
    uid = os.geteuid()
    if uid == 0:
        return DEFAULT
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    with contextlib.suppress(OSError):
        st = os.lstat(runtime) if runtime else None
        if st is not None and stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
            return os.path.join(runtime, "mreaper.lock")
    return f"/tmp/mreaper-{uid}.lock"


class InstanceLock:
    """The held lock; keep it for the life of the daemon (close() releases it)."""

    def __init__(self, path: str, fd: int, notes: list[str]) -> None:
        self.path, self._fd = path, fd
        self.notes = notes  # what was done to take it (a directory tightened), to be said

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the flock
            self._fd = -1


def _check_dir(directory: str) -> list[str]:
    """Refuse a lock directory another user could change; returns what was done to it.
    Its ancestors are walked as every trusted path is (trust.resolve); the directory
    itself must be root's or ours and not writable by others, or sticky.  Our default
    directory found writable by others (a Kubernetes emptyDir is made 0777) is made
    0700 through an fd, and said: it is ours, and loose it would let anyone in it
    replace the lock (or the status socket)."""
    notes: list[str] = []
    try:
        trust.resolve(os.path.dirname(directory), final_sticky_ok=True)
    except trust.Untrusted as e:
        raise InstanceError(f"lock directory {directory}: {e.reason()}") from None
    except OSError as e:
        raise InstanceError(f"lock directory {directory}: {e.strerror or e}") from None
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        if os.geteuid() != 0:
            raise InstanceError(f"lock directory {directory} does not exist") from None
        os.mkdir(directory, 0o700)  # /run/mreaper when run by hand, not by systemd
        st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise InstanceError(f"lock directory {directory} is not a directory (a symlink?): "
                            "refused")
    if st.st_uid not in (0, os.geteuid()):
        raise InstanceError(f"lock directory {directory} is owned by uid {st.st_uid}, "
                            f"neither root nor us (uid {os.geteuid()}): refused")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        if directory != os.path.dirname(DEFAULT):
            raise InstanceError(f"lock directory {directory} is writable by others (mode "
                                f"{stat.S_IMODE(st.st_mode):04o}) without the sticky bit: "
                                "another user could replace the lock file; refused")
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
        notes.append(f"{directory} was writable by others (mode "
                     f"{stat.S_IMODE(st.st_mode):04o}): made 0700")
    return notes


def acquire(path: str) -> InstanceLock:
    """Take the lock at `path` or raise AlreadyRunning (with the holder's PID) or
    InstanceError (naming the path and what is wrong with it)."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    notes = _check_dir(directory)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InstanceError(f"lock file {path} is a symlink: refused") from None
        raise InstanceError(f"lock file {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InstanceError(f"lock file {path} is not a regular file: refused")
        if st.st_uid != os.geteuid():
            raise InstanceError(f"lock file {path} is owned by uid {st.st_uid}, not by us "
                                f"(uid {os.geteuid()}): another user made it; remove it or "
                                "choose another with --lock-file")
        if st.st_nlink != 1:
            raise InstanceError(f"lock file {path} has {st.st_nlink} links: refused")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(path, _holder(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return InstanceLock(path, fd, notes)


def _holder(fd: int) -> int | None:
    """The PID the holder wrote (it may be writing it right now: None then)."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isascii() and text.isdigit() else None
