"""Paths a root daemon may trust, and files it may read without hanging.

A file that decides what root runs or kills (the configuration, a hook, the status
socket's directory) is only as safe as every step of the path that leads to it: a
root-owned hook in a directory another user can write is replaced by that user, and a
symlink another user owns is pointed wherever they like.  `resolve` walks a path from
/ one component at a time, following symlinks itself, and refuses it unless each
directory, symlink and the file at its end is owned by root (or the daemon's own
euid) and none can be written by anyone else:

- a directory writable by group or others is refused, except a sticky one owned by a
  trusted uid (/tmp, /var/tmp): there the kernel lets only the owner of an entry, the
  owner of the directory or CAP_FOWNER rename or unlink that entry (fs/namei.c
  may_delete -> check_sticky), and every entry we pass must itself be trusted-owned,
  so nobody else can replace it.  Refusing /tmp outright would add no safety and
  would refuse every path under it, pytest's tmp_path included;
- a symlink must be owned by a trusted uid (its mode means nothing), and its target
  is walked the same way, component by component;
- the file at the end: trusted owner, not writable by group or others; in a sticky
  directory, also not one of several hard links (another user could have linked any
  root-owned file, a binary say, under the expected name, where fs.protected_hardlinks
  is 0).

Once every component is trusted, only root can change what the path resolves to, so
a path checked immediately before use is used as checked.

The other half is never blocking on a special file: a FIFO put where a regular file
is expected hangs an open() for reading (no writer) or a read() (a writer that never
closes); /dev/zero never ends.  `read_regular` opens with O_NONBLOCK, checks fstat
and reads at most a limit.  `is_kernel_pressure_file` tells the kernel's own PSI file
(procfs or cgroup2) from a FIFO, /dev/null or a regular file put in its place.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import stat
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

MAX_SYMLINKS = 40   # the kernel's own limit on symlinks followed in one lookup (ELOOP)

# statfs(2) f_type values (include/uapi/linux/magic.h)
PROC_SUPER_MAGIC = 0x9FA0
CGROUP2_SUPER_MAGIC = 0x63677270


class Untrusted(Exception):
    """A component of a path another user could change."""

    def __init__(self, component: str, kind: str, problem: str, *, final: bool,
                 context: str = "") -> None:
        self.component = component  # the path of the offending file, directory or symlink
        self.kind = kind            # "file", "directory", "symlink", "socket"
        self.problem = problem      # "owned by uid 65534, not root", "writable by ..."
        self.final = final          # the object at the end of the path (not on the way)
        self.context = context      # e.g. "its interpreter /usr/bin/python3 (#!): "
        super().__init__(self.reason())

    def fix(self) -> str:
        if self.kind == "symlink":
            return (f"replace {self.component} with a root-owned symlink (chown -h root:root "
                    f"{self.component}) or name the real path")
        return f"chown root:root {self.component} && chmod go-w {self.component}"

    def reason(self, named: str | None = None) -> str:
        """'refused: ...; mreaper runs as root, so fix it with: ...'; the component is
        named unless it is the file the caller names itself (`named`)."""
        if self.final and self.component == named and not self.context:
            what = self.problem
        elif self.final:
            what = f"{self.kind} {self.component} is {self.problem}"
        else:
            what = f"{self.kind} {self.component} on its path is {self.problem}"
        return (f"refused: {self.context}{what}; mreaper runs as root, so fix it with: "
                f"{self.fix()}")


def trusted_uids() -> frozenset[int]:
    """Root and the uid the daemon runs as."""
    return frozenset({0, os.geteuid()})


def describe_type(mode: int) -> str:
    """'a FIFO', 'a character device', ... for a file mode."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return f"a file of type {stat.S_IFMT(mode):o}"


def _problems(st: os.stat_result, trusted: Collection[int], *, sticky_ok: bool) -> list[str]:
    problems = []
    if st.st_uid not in trusted:
        owner = "root" if trusted == {0} or set(trusted) == {0} else \
            "root or uid " + ", ".join(str(u) for u in sorted(set(trusted) - {0}))
        problems.append(f"owned by uid {st.st_uid}, not {owner}")
    writers = [who for who, bit in (("group", 0o020), ("others", 0o002)) if st.st_mode & bit]
    if writers and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        problems.append(f"writable by {' and '.join(writers)} "
                        f"(mode {stat.S_IMODE(st.st_mode):04o})")
    return problems


@dataclass(frozen=True, slots=True)
class Resolved:
    """A path walked and found trusted: its real path (no symlinks) and the lstat of
    its last component."""

    path: str
    st: os.stat_result


def resolve(path: str, *, trusted: Collection[int] | None = None,
            final_sticky_ok: bool = False) -> Resolved:
    """Walk `path` from / as the kernel would, checking each component on the way.

    Raises Untrusted for a component another user could change, OSError for a path
    that cannot be walked (ENOENT, ENOTDIR, ELOOP, EACCES...).  `final_sticky_ok`
    lets the last component be a sticky directory writable by others (as a directory
    on the way may be)."""
    if not path.startswith("/"):
        raise OSError(errno.EINVAL, f"{path}: not an absolute path")
    allowed = trusted_uids() if trusted is None else frozenset(trusted)
    st = root_st = os.lstat("/")
    if problems := _problems(st, allowed, sticky_ok=True):
        raise Untrusted("/", "directory", " and ".join(problems), final=path == "/")
    current, current_st = "/", root_st
    pending = deque(p for p in path.split("/") if p)
    links = 0
    while pending:
        name = pending.popleft()
        if name == ".":
            continue
        if name == "..":
            # `current` has no symlink in it (we resolved each one), so ".." is lexical
            current = os.path.dirname(current)
            current_st = os.lstat(current)
            continue
        candidate = os.path.join(current, name)
        st = os.lstat(candidate)
        last = not pending
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in allowed:  # its mode (always 0777) means nothing
                raise Untrusted(candidate, "symlink", _problems(st, allowed, sticky_ok=True)[0],
                                final=False)
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            target = os.readlink(candidate)
            if target.startswith("/"):
                current, current_st = "/", root_st
            pending.extendleft(reversed([p for p in target.split("/") if p]))
            continue
        if last:
            kind = "directory" if stat.S_ISDIR(st.st_mode) else \
                "socket" if stat.S_ISSOCK(st.st_mode) else "file"
            problems = _problems(st, allowed,
                                 sticky_ok=final_sticky_ok and stat.S_ISDIR(st.st_mode))
            if (current_st.st_mode & 0o022 and not stat.S_ISDIR(st.st_mode)
                    and st.st_nlink > 1):
                # In a directory anyone can write to (sticky, or it was refused above),
                # another user can have made this name a hard link to any root-owned
                # file, e.g. a binary (unless fs.protected_hardlinks = 1)
                problems.append(f"one of {st.st_nlink} hard links, in {current}, a "
                                "directory anyone can write to")
            if problems:
                raise Untrusted(candidate, kind, " and ".join(problems), final=True)
        else:
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), candidate)
            if problems := _problems(st, allowed, sticky_ok=True):
                raise Untrusted(candidate, "directory", " and ".join(problems), final=False)
        current, current_st = candidate, st
    if current == "/" or not path.strip("/"):
        return Resolved("/", os.lstat("/"))
    return Resolved(current, st)


# --- executables ------------------------------------------------------------------------------


class NotExecutable(OSError):
    """Not a regular file with an execute bit."""


MAX_INTERPRETERS = 4   # binfmt_script may nest this deep (fs/exec.c: 5 levels of binfmt)
BINPRM_BUF_SIZE = 256  # the kernel reads a "#!" line from these first bytes


def check_executable(path: str, *, enforce: bool) -> None:
    """`path` is a regular file with an execute bit and, if `enforce`, a trusted path
    (see resolve); so is the interpreter its "#!" line names, if it has one (the kernel
    runs that interpreter as root too).  Raises Untrusted, NotExecutable or OSError."""
    context = ""
    for _ in range(MAX_INTERPRETERS + 1):
        if enforce:
            try:
                real = resolve(path).path
            except Untrusted as e:
                raise Untrusted(e.component, e.kind, e.problem, final=e.final,
                                context=context) from None
        else:
            real = path
        st = os.stat(real)
        if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o111:
            raise NotExecutable(errno.EACCES, f"{context}{path} is not an executable file", path)
        if not enforce:
            return  # not root: nothing to trust, and an execute-only file is fine
        fd = open_regular(real, nofollow=True)
        try:
            head = os.read(fd, BINPRM_BUF_SIZE)
        finally:
            os.close(fd)
        if not head.startswith(b"#!"):
            return
        words = head[2:].split(b"\n", 1)[0].split()
        if not words:
            return  # the kernel refuses it at exec (ENOEXEC); run_hook reports that
        interpreter = os.fsdecode(words[0])
        if not interpreter.startswith("/"):
            raise NotExecutable(errno.ENOEXEC, f"{path}: its #! interpreter {interpreter!r} "
                                "is not an absolute path", path)
        context = f"{context}the #! interpreter of {path} ({interpreter}): "
        path = interpreter
    raise NotExecutable(errno.ELOOP, f"{path}: #! interpreters nested too deeply", path)


# --- reading without hanging ---------------------------------------------------------------


class NotRegular(OSError):
    """A path that names something other than a regular file (a FIFO, a device...)."""


def open_regular(path: str, *, nofollow: bool = False) -> int:
    """An O_RDONLY fd on `path`, which must be a regular file.  O_NONBLOCK: a FIFO (or a
    device) in its place is refused at once instead of blocking the open."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegular(errno.EINVAL, f"not a regular file but {describe_type(st.st_mode)}",
                             path)
    except BaseException:
        os.close(fd)
        raise
    return fd


class TooLarge(OSError):
    """A file longer than the limit it is read with."""


def read_fd(fd: int, limit: int, path: str = "") -> bytes:
    """At most `limit` bytes from `fd`, to its end; TooLarge if there is more."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = os.read(fd, min(1 << 16, limit + 1 - size))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise TooLarge(errno.EFBIG, f"larger than {limit} bytes", path)


def read_regular(path: str, limit: int) -> bytes:
    """The whole of the regular file `path`, at most `limit` bytes (see open_regular)."""
    fd = open_regular(path)
    try:
        return read_fd(fd, limit, path)
    finally:
        os.close(fd)


# --- the kernel's pressure files --------------------------------------------------------------


class _StatFs(ctypes.Structure):
    # Only f_type is read.  It is the first member of struct statfs everywhere; it is a
    # long (__fsword_t) except on s390x, where it is an unsigned int.  The buffer is
    # large enough for the whole structure on every architecture (<= 120 bytes).
    _fields_ = [("f_type", ctypes.c_uint if platform.machine() == "s390x" else ctypes.c_long),
                ("rest", ctypes.c_byte * 256)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fstatfs.restype = ctypes.c_int


def fs_magic(fd: int) -> int:
    """statfs(2) f_type of the filesystem holding the open file `fd`."""
    buf = _StatFs()
    if _libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(buf.f_type) & 0xFFFFFFFF


def kernel_pressure_file(fd: int, filesystems: Collection[int] | None = (
        PROC_SUPER_MAGIC, CGROUP2_SUPER_MAGIC)) -> str | None:
    """None if `fd` is open on a kernel PSI file (a regular file on procfs, as
    /proc/pressure/memory is, or on cgroup2, as memory.pressure is), else why not.
    `filesystems` None: a regular file on any filesystem will do (unit tests)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return f"not the kernel's pressure file but {describe_type(st.st_mode)}"
    if filesystems is None:
        return None
    magic = fs_magic(fd)
    if magic not in filesystems:
        return (f"not the kernel's pressure file: a regular file on a filesystem of type "
                f"{magic:#x}, not procfs or cgroup2")
    return None
