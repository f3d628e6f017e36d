"""Run one command in a throw-away QEMU VM with real memory pressure semantics.

The VM boots a stock Debian ``linux-image-*-amd64`` kernel (fetched once with
``apt-get download`` and unpacked into a cache), sees the host's whole filesystem
read-only through 9p with a tmpfs overlay on top (so it can write anywhere, and
everything is thrown away), and runs the command as root with:

* pure cgroup v2 at ``/sys/fs/cgroup`` (``cgroup_no_v1=all``), with ``cpu io memory
  pids`` enabled in the root's ``cgroup.subtree_control``;
* PSI (``/proc/pressure/*``), ``process_mrelease(2)``, the kernel's own OOM killer;
* optionally zram swap (``zram=``), systemd as PID 1 (``systemd=True``), extra
  kernel modules (``modules=``) and host directories shared read-write (``rw=``).

The command's stdout and stderr are streamed back (through files in a job directory
shared over 9p), and its exit status is returned: 124 when the timeout ran out, 125
when the VM stopped without reporting one (the last console lines are printed then).
QEMU never outlives the runner: it is started in its own session with
``PR_SET_PDEATHSIG=SIGKILL`` and killed in ``finally`` (also on SIGTERM and SIGHUP,
which are turned into exceptions while a VM runs in the main thread).

KVM is used where it can boot a stock kernel; hosts whose ``/dev/kvm`` is PVM
(``kvm_pvm``, which only runs PVM-patched guests) or that have no usable KVM get TCG.
Under TCG the guest runs about 10x slower than native code, so allow for that in
time limits; memory behaves for real.

Library use::

    from lab import labvm
    res = labvm.run(["/usr/bin/python3", "-c", "print(1)"], mem_mib=1024, timeout=120)
    res.returncode, res.stdout, res.stderr, res.console

Command line::

    python -m lab.labvm [--mem MiB] [--timeout S] [--zram SIZE] [--systemd]
                        [--rw DIR]... [--module NAME]... [-v] -- CMD [ARG...]

Environment: ``MREAPER_LAB_CACHE`` (cache dir, default ``~/.cache/mreaper-lab``),
``MREAPER_LAB_KERNEL`` (a vmlinuz path whose modules are in the matching
``lib/modules/VERSION``, instead of the apt-fetched kernel),
``MREAPER_LAB_KERNEL_PKG`` (Debian package to fetch instead of what
``linux-image-amd64`` depends on), ``MREAPER_LAB_ACCEL`` (``auto``, ``kvm``, ``tcg``),
``MREAPER_LAB_TCG_THREAD`` (``single``, the default, or ``multi``).
Inside the VM, ``MREAPER_LAB=1`` is set.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import hashlib
import io
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO, TextIO

#: Bump when the guest scripts or the initramfs layout change (part of the cache key).
FORMAT_VERSION = 1

EXIT_TIMEOUT = 124
EXIT_VM_DIED = 125

QEMU = "qemu-system-x86_64"
QBOOT = Path("/usr/share/qemu/qboot.rom")
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
#: Loaded by the initramfs, in dependency order after resolution.
BASE_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
#: Loaded in the VM (from the host path of the cached kernel) for ``zram=``.
ZRAM_MODULES = ("zram",)
GUEST_DIR = "/run/mreaper-lab"
TMP_PREFIX = "mreaper-lab-"
JOB_TAG = "labjob"
ROOT_TAG = "hostroot"
MSIZE = 512000

KERNEL_CMDLINE = (
    "console=ttyS0 quiet panic=-1 rdinit=/init psi=1 cgroup_no_v1=all "
    "systemd.unified_cgroup_hierarchy=1 "
    # Boot-time savers under TCG (pci=noacpi alone saves ~0.7 s).
    "pci=noacpi mitigations=off cryptomgr.notests tsc=reliable no_timer_check "
    "random.trust_cpu=on i8042.noaux i8042.nopnp audit=0 nowatchdog"
)

# Units systemd would start that cost tens of seconds over 9p under TCG.
SYSTEMD_MASKED_UNITS = (
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-clean.timer",
    "systemd-timesyncd.service",
    "systemd-journal-flush.service",
    "systemd-udev-trigger.service",
    "systemd-remount-fs.service",
    "systemd-update-utmp.service",
    "systemd-sysusers.service",
    "systemd-modules-load.service",
    "systemd-random-seed.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "man-db.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "logrotate.timer",
)


class LabError(RuntimeError):
    """The VM could not be prepared (no qemu, no kernel, no busybox...)."""


class CommandNotFound(LabError):
    """argv[0] is not on the host's PATH (the CLI exits 127)."""


class _Terminated(BaseException):
    """Raised from the SIGTERM/SIGHUP handler so that ``finally`` kills QEMU."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclasses.dataclass
class LabResult:
    """Outcome of one VM run."""

    returncode: int
    stdout: bytes
    stderr: bytes
    console: str
    timed_out: bool
    #: Seconds from QEMU start until the guest was about to exec the command.
    boot_s: float | None
    #: Seconds from QEMU start until QEMU was gone.
    total_s: float
    accel: str
    qemu_pid: int | None
    qemu_argv: list[str]

    def console_tail(self, n: int = 25) -> str:
        return "\n".join(self.console.splitlines()[-n:])

    def last_json(self) -> dict[str, Any]:
        """The last line of stdout that starts with "{", as JSON: what a guest script
        reports.  AssertionError with the output and the console's tail when the VM
        failed or the script printed no such line."""
        out = self.stdout.decode(errors="replace")
        lines = [x for x in out.splitlines() if x.startswith("{")]
        assert self.returncode == 0 and lines, (
            f"VM exit {self.returncode}\nstdout:\n{out[-3000:]}\nstderr:\n"
            f"{self.stderr.decode(errors='replace')[-3000:]}\nconsole:\n{self.console_tail(40)}")
        result: dict[str, Any] = json.loads(lines[-1])
        return result


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    env = os.environ.get("MREAPER_LAB_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "mreaper-lab"
    base.mkdir(parents=True, exist_ok=True)
    return base


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise cache building between concurrent runners."""
    import fcntl

    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# -------------------------------------------------------------------------- kernel


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A bootable kernel image plus its modules tree."""

    vmlinuz: Path
    version: str
    moddir: Path  # .../lib/modules/VERSION


def _run_quiet(argv: Sequence[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(
        argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise LabError(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _apt_lists_key() -> str:
    lists = Path("/var/lib/apt/lists")
    try:
        return str(lists.stat().st_mtime_ns)
    except OSError:
        return "none"


def _resolve_kernel_package() -> str:
    """Name of the Debian package that ``linux-image-amd64`` currently depends on."""
    pinned = os.environ.get("MREAPER_LAB_KERNEL_PKG")
    if pinned:
        return pinned

    def query() -> str | None:
        try:
            out = _run_quiet(["apt-cache", "depends", "linux-image-amd64"])
        except (LabError, FileNotFoundError):
            return None
        m = re.search(r"Depends:\s*(linux-image-\S+-amd64)\b", out)
        return m.group(1) if m else None

    pkg = query()
    if pkg is None and os.geteuid() == 0:
        _run_quiet(["apt-get", "update", "-qq"])
        pkg = query()
    if pkg is None:
        raise LabError(
            "cannot resolve linux-image-amd64 with apt-cache (run apt-get update, or set "
            "MREAPER_LAB_KERNEL_PKG / MREAPER_LAB_KERNEL)"
        )
    if "cloud" in pkg:
        raise LabError(f"{pkg}: the cloud kernel has no 9p; use the generic -amd64 flavour")
    return pkg


def _kernel_from_root(root: Path) -> Kernel:
    images = sorted((root / "boot").glob("vmlinuz-*"))
    if not images:
        raise LabError(f"no boot/vmlinuz-* under {root}")
    vmlinuz = images[-1]
    version = vmlinuz.name.removeprefix("vmlinuz-")
    return Kernel(vmlinuz, version, root / "lib" / "modules" / version)


def fetch_kernel(log: Callable[[str], None] = lambda s: None) -> Kernel:
    """The kernel to boot: ``MREAPER_LAB_KERNEL``, or a Debian package unpacked in the cache.

    The package is what ``linux-image-amd64`` depends on.  apt is asked again only
    when its lists changed (``apt-get update``) since the last resolution.
    """
    explicit = os.environ.get("MREAPER_LAB_KERNEL")
    if explicit:
        vmlinuz = Path(explicit).resolve()
        version = vmlinuz.name.removeprefix("vmlinuz-")
        root = vmlinuz.parent.parent
        moddir = root / "lib" / "modules" / version
        if not moddir.is_dir():
            moddir = Path("/lib/modules") / version
        return Kernel(vmlinuz, version, moddir)

    cache = cache_dir()
    kdir = cache / "kernel"
    kdir.mkdir(exist_ok=True)
    pointer = kdir / "current.json"
    with _locked(cache / ".lock"):
        key = f"{_apt_lists_key()}:{os.environ.get('MREAPER_LAB_KERNEL_PKG', '')}"
        pkg: str | None = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            data = json.loads(pointer.read_text())
            if data["key"] == key and (kdir / data["pkg"] / "boot").is_dir():
                pkg = str(data["pkg"])
        if pkg is None:
            pkg = _resolve_kernel_package()
            root = kdir / pkg
            if not (root / "boot").is_dir():
                log(f"labvm: fetching {pkg} with apt-get download (once)")
                with tempfile.TemporaryDirectory(dir=kdir) as tmp:
                    tmpd = Path(tmp)
                    os.chmod(tmpd, 0o755)  # apt's _apt sandbox user must be able to write
                    _run_quiet(["apt-get", "download", "-q", pkg], cwd=tmpd)
                    debs = list(tmpd.glob("*.deb"))
                    if len(debs) != 1:
                        raise LabError(f"apt-get download {pkg} gave {debs}")
                    unpack = tmpd / "root"
                    _run_quiet(["dpkg-deb", "-x", str(debs[0]), str(unpack)])
                    unpack.rename(root)
            pointer.write_text(json.dumps({"key": key, "pkg": pkg}))
        return _kernel_from_root(kdir / pkg)


def _bzimage_payload(data: bytes) -> bytes | None:
    """Decompress the vmlinux ELF inside a bzImage (x86 boot protocol >= 2.08)."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        # One stream followed by the 4-byte uncompressed size: not lzma.decompress().
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if payload.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    if payload.startswith(b"\x5d\x00\x00"):
        return lzma.decompress(payload, format=lzma.FORMAT_ALONE)
    return None  # zstd, lz4, bzip2, lzo: boot the bzImage as it is


def _has_pvh_note(elf: bytes) -> bool:
    """Whether an ELF vmlinux carries XEN_ELFNOTE_PHYS32_ENTRY (QEMU boots it via PVH)."""
    return elf[:4] == b"\x7fELF" and b"Xen\x00" in elf and _find_note(elf, b"Xen", 18)


def _find_note(elf: bytes, owner: bytes, ntype: int) -> bool:
    if elf[4] != 2:  # ELFCLASS64 only
        return False
    e_phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        p_type = struct.unpack_from("<I", elf, off)[0]
        if p_type != 4:  # PT_NOTE
            continue
        p_offset, _, _, p_filesz = struct.unpack_from("<QQQQ", elf, off + 8)
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, typ = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == owner and typ == ntype:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def boot_image(kernel: Kernel) -> Path:
    """An uncompressed PVH vmlinux when possible (saves ~4 s of xz under TCG)."""
    cache = cache_dir()
    key = _sha(_file_key(kernel.vmlinuz))
    out = cache / f"vmlinux-{kernel.version}-{key}"
    if out.exists():
        return out
    with _locked(cache / ".lock"):
        if out.exists():
            return out
        marker = cache / f"vmlinux-{kernel.version}-{key}.bzimage"
        if marker.exists():
            return kernel.vmlinuz
        elf = _bzimage_payload(kernel.vmlinuz.read_bytes())
        if elf is None or not _has_pvh_note(elf):
            marker.touch()
            return kernel.vmlinuz
        for old in cache.glob(f"vmlinux-{kernel.version}-*"):
            old.unlink()
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(elf)
        tmp.rename(out)
    return out


# ------------------------------------------------------------------------- modules


def _modinfo_depends(ko: Path) -> list[str]:
    """``depends=`` of a kernel module, read from its ``.modinfo`` ELF section."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise LabError(f"{ko}: not an ELF64 module (compressed modules are not supported)")
    e_shoff = struct.unpack_from("<Q", data, 0x28)[0]
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        off = e_shoff + i * e_shentsize
        name, _typ, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", data, off)
        return name, offset, size

    _, stroff, _ = section(e_shstrndx)
    for i in range(e_shnum):
        name, offset, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name : end] == b".modinfo":
            for field in data[offset : offset + size].split(b"\0"):
                if field.startswith(b"depends="):
                    deps = field[len(b"depends=") :].decode()
                    return [d for d in deps.split(",") if d]
            return []
    return []


def _module_index(moddir: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for ko in (moddir / "kernel").rglob("*.ko"):
        index[ko.name[:-3].replace("-", "_")] = ko
    return index


def resolve_modules(moddir: Path, names: Sequence[str]) -> list[Path]:
    """Module files for ``names`` and their dependencies, dependencies first."""
    index = _module_index(moddir)
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        ko = index.get(key)
        if ko is None:
            builtin = moddir / "modules.builtin"
            if builtin.exists() and f"/{name}.ko" in builtin.read_text().replace("-", "_"):
                return
            raise LabError(f"kernel module {name!r} not found under {moddir}")
        for dep in _modinfo_depends(ko):
            visit(dep)
        order.append(ko)

    for n in names:
        visit(n)
    return order


# ----------------------------------------------------------------------- initramfs

STAGE1 = r"""#!/bin/busybox sh
# mreaper lab VM, stage 1 (initramfs): mount the host root read-only over 9p with a
# tmpfs overlay on top, the job dir and the --rw dirs, then switch_root.
die() { echo "labvm stage1: $*"; echo o > /proc/sysrq-trigger; sleep 5; exit 1; }
mount -t devtmpfs dev /dev || die "devtmpfs"
mount -t proc proc /proc
mount -t sysfs sys /sys
while read -r m; do insmod "/lib/modules/$m" || die "insmod $m"; done < /modules.list
O="trans=virtio,version=9p2000.L,msize=@MSIZE@"
mount -t 9p -o "$O,cache=none" @JOB_TAG@ /job || die "mount job dir"
. /job/config
mount -t 9p -o "$O,ro,cache=loose" @ROOT_TAG@ /lower || die "mount host root"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
  || die "mount overlay"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run
mkdir -p /newroot@GUEST_DIR@/job
mount --move /job /newroot@GUEST_DIR@/job
i=0
while [ "$i" -lt "$LAB_RW_N" ]; do
  eval "p=\$LAB_RW_$i"
  mkdir -p "/newroot$p"
  mount -t 9p -o "$O,cache=none" "rw$i" "/newroot$p" || die "mount --rw $p"
  i=$((i + 1))
done
cp /bin/busybox /stage2 /newroot@GUEST_DIR@/
for d in dev proc sys; do mount --move /$d /newroot/$d; done
exec switch_root /newroot @GUEST_DIR@/busybox sh @GUEST_DIR@/stage2
"""

STAGE2 = r"""# mreaper lab VM, stage 2 (PID 1 in the overlay root, run by busybox sh).
G=@GUEST_DIR@
BB=$G/busybox
J=$G/job
. $J/config
$BB mkdir -p /dev/pts /dev/shm
$BB mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
$BB mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
$BB mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 /sys/fs/cgroup
echo "+cpu +io +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control
$BB mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
$BB hostname mreaper-lab
$BB ip link set lo up 2>/dev/null
for m in $LAB_MODULES; do $BB insmod "$m" || echo "labvm: insmod $m failed"; done
if [ -n "$LAB_ZRAM" ]; then
  echo "$LAB_ZRAM" > /sys/block/zram0/disksize \
    && $BB mkswap /dev/zram0 >/dev/null && $BB swapon /dev/zram0 \
    || echo "labvm: zram swap setup failed"
fi
$BB cat > $G/runjob <<EOF
$BB touch $J/started
$BB sh $J/cmd > $J/stdout 2> $J/stderr < /dev/null
echo \$? > $J/rc.tmp
$BB mv $J/rc.tmp $J/rc
EOF
if [ -z "$LAB_SYSTEMD" ]; then
  $BB sh $G/runjob
  echo o > /proc/sysrq-trigger
  $BB sleep 10
  exit 0
fi
# --systemd: a oneshot unit runs the job, then powers the VM off.
$BB rm -f /.dockerenv /run/.containerenv
$BB mkdir -p /run/systemd/system /etc/systemd/system /etc/systemd/system-generators
for g in /lib/systemd/system-generators/* /usr/lib/systemd/system-generators/*; do
  [ -e "$g" ] && $BB ln -sf /dev/null "/etc/systemd/system-generators/${g##*/}"
done
for u in @MASKED@; do $BB ln -sf /dev/null "/etc/systemd/system/$u"; done
$BB cat > /run/systemd/system/mreaper-lab.target <<EOF
[Unit]
Description=mreaper lab job
Requires=mreaper-lab-job.service
After=mreaper-lab-job.service
AllowIsolate=yes
EOF
$BB cat > /run/systemd/system/mreaper-lab-job.service <<EOF
[Unit]
Description=mreaper lab job
[Service]
Type=oneshot
ExecStartPre=-/bin/sh -c 'echo "+cpu +io +memory +pids" > /sys/fs/cgroup/cgroup.subtree_control'
ExecStart=$BB sh $G/runjob
TimeoutStartSec=infinity
SuccessAction=poweroff-immediate
FailureAction=poweroff-immediate
EOF
exec /lib/systemd/systemd --unit=mreaper-lab.target --show-status=0
"""


def _render(template: str) -> str:
    return (
        template.replace("@MSIZE@", str(MSIZE))
        .replace("@JOB_TAG@", JOB_TAG)
        .replace("@ROOT_TAG@", ROOT_TAG)
        .replace("@GUEST_DIR@", GUEST_DIR)
        .replace("@MASKED@", " ".join(SYSTEMD_MASKED_UNITS))
    )


class _Cpio:
    """Minimal writer of the ``newc`` cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        nameb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self.buf.write(nameb)
        self.buf.write(b"\0" * (-(110 + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def find_busybox() -> Path:
    for p in BUSYBOX_CANDIDATES:
        if p.exists():
            head = p.read_bytes()[:4096]
            if b"INTERP" not in head and b"ld-linux" not in head:  # static only
                return p
    raise LabError("no static busybox found: apt-get install busybox-static")


def build_initramfs(kernel: Kernel) -> Path:
    """The initramfs (busybox + stage scripts + 9p/virtio/overlay modules), cached by content."""
    busybox = find_busybox()
    modules = resolve_modules(kernel.moddir, BASE_MODULES)
    stage1, stage2 = _render(STAGE1).encode(), _render(STAGE2).encode()
    bb = busybox.read_bytes()
    mod_data = [(ko.name, ko.read_bytes()) for ko in modules]
    key = _sha(str(FORMAT_VERSION), bb, stage1, stage2, *(n + ":" for n, _ in mod_data),
               *(d for _, d in mod_data))
    cache = cache_dir()
    out = cache / f"initrd-{kernel.version}-{key}.cpio"
    if out.exists():
        return out
    applets = _run_quiet([str(busybox), "--list"]).split()
    c = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "job", "lower", "rw", "newroot", "lib", "lib/modules"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3)
    c.file("bin/busybox", bb, 0o755)
    for a in applets:
        if a != "busybox" and "/" not in a:
            c.symlink(f"bin/{a}", "busybox")
    for name, data in mod_data:
        c.file(f"lib/modules/{name}", data)
    c.file("modules.list", "".join(f"{n}\n" for n, _ in mod_data).encode())
    c.file("init", stage1, 0o755)
    c.file("stage2", stage2, 0o755)
    with _locked(cache / ".lock"):
        for old in cache.glob(f"initrd-{kernel.version}-*.cpio"):
            old.unlink()
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(c.finish())
        tmp.rename(out)
    return out


# ------------------------------------------------------------------------ accel


def kvm_status() -> tuple[bool, str]:
    """Whether KVM can boot a stock kernel here, and why (not)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm missing or not accessible"
    if Path("/sys/module/kvm_pvm").exists():
        return False, "/dev/kvm is kvm_pvm (PVM runs only PVM-patched guest kernels)"
    if not (Path("/sys/module/kvm_intel").exists() or Path("/sys/module/kvm_amd").exists()):
        return False, "neither kvm_intel nor kvm_amd is loaded"
    return True, "kvm_intel/kvm_amd"


def choose_accel(requested: str | None = None) -> str:
    req = requested or os.environ.get("MREAPER_LAB_ACCEL", "auto")
    if req not in ("auto", "kvm", "tcg"):
        raise LabError(f"accel must be auto, kvm or tcg, not {req!r}")
    usable, why = kvm_status()
    if req == "auto":
        return "kvm" if usable else "tcg"
    if req == "kvm" and not usable:
        raise LabError(f"KVM cannot boot a stock kernel here: {why}")
    return req


# ---------------------------------------------------------------------------- run


def _shell_env(env: Mapping[str, str]) -> str:
    lines = []
    for k, v in sorted(env.items()):
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) and "\0" not in v:
            lines.append(f"export {k}={shlex.quote(v)}")
    return "\n".join(lines) + "\n"


def _resolve_argv0(argv: Sequence[str], env: Mapping[str, str], cwd: str) -> list[str]:
    """Absolute argv[0]: busybox sh would otherwise prefer its own applets (ls, sh...)."""
    prog = argv[0]
    if "/" in prog:
        return [os.path.join(cwd, prog), *argv[1:]]
    found = shutil.which(prog, path=env.get("PATH", os.defpath))
    if found is None:
        raise CommandNotFound(f"command not found on the host: {prog}")
    return [os.path.abspath(found), *argv[1:]]


def _set_pdeathsig(parent: int) -> Callable[[], None]:
    def pre() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the runner died before prctl
            os._exit(1)

    return pre


class _Tail(threading.Thread):
    """Copies a growing file to a sink and keeps a copy, until told to stop."""

    def __init__(self, path: Path, sink: BinaryIO | None) -> None:
        super().__init__(daemon=True)
        self.path, self.sink = path, sink
        self.data = bytearray()
        self.stopping = threading.Event()

    def _pump(self, fh: BinaryIO) -> bool:
        chunk = fh.read(1 << 16)
        if not chunk:
            return False
        self.data += chunk
        if self.sink is not None:
            with contextlib.suppress(OSError, ValueError):
                self.sink.write(chunk)
                self.sink.flush()
        return True

    def run(self) -> None:
        fh: BinaryIO | None = None
        try:
            while True:
                final = self.stopping.is_set()
                if fh is None:
                    with contextlib.suppress(FileNotFoundError):
                        fh = self.path.open("rb")
                if fh is not None:
                    while self._pump(fh):
                        pass
                if final:
                    return
                self.stopping.wait(0.05)
        finally:
            if fh is not None:
                fh.close()

    def finish(self) -> bytes:
        self.stopping.set()
        self.join()
        return bytes(self.data)


def _proc_identity(pid: int) -> str | None:
    """``pid:starttime`` of a live process (start time tells a reused pid apart)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{pid}:{stat_line.rsplit(')', 1)[1].split()[19]}"


def _remove_stale_tmp() -> None:
    """Remove job dirs left by runners that were SIGKILLed (their QEMU died with them)."""
    for d in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        try:
            owner = (d / "owner").read_text()
        except OSError:
            continue
        pid = owner.split(":", 1)[0]
        if pid.isdigit() and _proc_identity(int(pid)) != owner:
            shutil.rmtree(d, ignore_errors=True)


def prepare(log: Callable[[str], None] = lambda s: None) -> tuple[Kernel, Path, Path]:
    """Fetch/unpack the kernel and build the boot image and initramfs (cached)."""
    if shutil.which(QEMU) is None:
        raise LabError(f"{QEMU} not found: apt-get install qemu-system-x86 (scripts/install-deps)")
    kernel = fetch_kernel(log)
    return kernel, boot_image(kernel), build_initramfs(kernel)


def run(
    argv: Sequence[str],
    *,
    mem_mib: int = 1024,
    cpus: int = 2,
    timeout: float | None = None,
    zram: str | None = None,
    systemd: bool = False,
    rw: Sequence[str | os.PathLike[str]] = (),
    modules: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
    log: TextIO | None = sys.stderr,
    accel: str | None = None,
    verbose: bool = False,
) -> LabResult:
    """Boot a throw-away VM, run ``argv`` in it as root, return its result.

    ``stdout``/``stderr`` receive the command's output as it is produced (it is also
    kept in the result).  ``log`` receives the runner's own messages (timeouts, the
    console tail when the VM dies, ``verbose`` details); ``None`` silences them.
    ``timeout`` counts from QEMU's start, boot included.  ``env`` defaults to
    ``os.environ`` and ``cwd`` to the current directory (both as seen in the VM).
    """
    if not argv:
        raise ValueError("empty command")

    def say(msg: str) -> None:
        if log is not None:
            print(msg, file=log, flush=True)

    t_prep = time.monotonic()
    kernel, image, initrd = prepare(say)
    env = dict(os.environ if env is None else env)
    env["MREAPER_LAB"] = "1"
    cwd_s = os.path.abspath(os.fspath(cwd) if cwd is not None else os.getcwd())
    full_argv = _resolve_argv0(argv, env, cwd_s)
    rw_dirs = [os.path.abspath(os.fspath(d)) for d in rw]
    for d in rw_dirs:
        if not os.path.isdir(d):
            raise LabError(f"--rw {d}: not a directory")
    extra = list(modules) + (list(ZRAM_MODULES) if zram else [])
    extra_paths = resolve_modules(kernel.moddir, extra) if extra else []
    accel_used = choose_accel(accel)

    _remove_stale_tmp()
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    (tmp / "owner").write_text(_proc_identity(os.getpid()) or "")
    job = tmp / "job"
    job.mkdir(mode=0o700)
    config = [
        f"LAB_RW_N={len(rw_dirs)}",
        *(f"LAB_RW_{i}={shlex.quote(d)}" for i, d in enumerate(rw_dirs)),
        f"LAB_ZRAM={shlex.quote(zram or '')}",
        f"LAB_SYSTEMD={'1' if systemd else ''}",
        f"LAB_MODULES={shlex.quote(' '.join(str(p) for p in extra_paths))}",
    ]
    (job / "config").write_text("\n".join(config) + "\n")
    (job / "cmd").write_text(
        _shell_env(env) + f"cd {shlex.quote(cwd_s)} || cd /\nexec {shlex.join(full_argv)}\n"
    )
    console = tmp / "console.log"
    qemu_log = tmp / "qemu.log"

    qemu_argv = [
        QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-machine", "pc", "-m", f"{mem_mib}M", "-smp", str(cpus),
        "-kernel", str(image), "-initrd", str(initrd), "-append", KERNEL_CMDLINE,
        "-serial", f"file:{console}",
        "-fsdev", f"local,id={ROOT_TAG},path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", f"virtio-9p-pci,fsdev={ROOT_TAG},mount_tag={ROOT_TAG}",
        "-fsdev", f"local,id={JOB_TAG},path={job},security_model=none",
        "-device", f"virtio-9p-pci,fsdev={JOB_TAG},mount_tag={JOB_TAG}",
    ]  # fmt: skip
    for i, d in enumerate(rw_dirs):
        qemu_argv += [
            "-fsdev", f"local,id=rw{i},path={d},security_model=none,multidevs=remap",
            "-device", f"virtio-9p-pci,fsdev=rw{i},mount_tag=rw{i}",
        ]  # fmt: skip
    if QBOOT.exists():
        qemu_argv += ["-bios", str(QBOOT)]
    if accel_used == "kvm":
        qemu_argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        thread = os.environ.get("MREAPER_LAB_TCG_THREAD", "single")
        qemu_argv += ["-accel", f"tcg,thread={thread},tb-size=256", "-cpu", "max"]
    if verbose:
        say(f"labvm: kernel {kernel.version}, accel {accel_used} ({kvm_status()[1]})")
        say(f"labvm: {shlex.join(qemu_argv)}")

    outs = _Tail(job / "stdout", stdout)
    errs = _Tail(job / "stderr", stderr)
    proc: subprocess.Popen[bytes] | None = None
    timed_out = False
    boot_s: float | None = None
    rc: int | None = None
    old_handlers: dict[int, Any] = {}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise _Terminated(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            old_handlers[sig] = signal.signal(sig, on_signal)
    t0, t0_wall = time.monotonic(), time.time()
    try:
        with qemu_log.open("wb") as qlog:
            # preexec_fn only calls prctl(): PR_SET_PDEATHSIG has no Popen equivalent.
            proc = subprocess.Popen(
                qemu_argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_set_pdeathsig(os.getpid()),  # noqa: PLW1509
            )  # fmt: skip
        outs.start()
        errs.start()
        deadline = None if timeout is None else t0 + timeout
        rc_file = job / "rc"
        while True:
            if rc_file.exists():
                # Output went through cache=none 9p: it is all on the host already.
                with contextlib.suppress(ValueError, OSError):
                    rc = int(rc_file.read_text().strip())
                break
            if proc.poll() is not None:
                with contextlib.suppress(ValueError, OSError):
                    rc = int(rc_file.read_text().strip())
                break
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                break
            time.sleep(0.02)
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        total_s = time.monotonic() - t0
        with contextlib.suppress(OSError):  # stamped by the host's 9p server: host clock
            boot_s = (job / "started").stat().st_mtime - t0_wall
        out_b = outs.finish() if outs.is_alive() else bytes(outs.data)
        err_b = errs.finish() if errs.is_alive() else bytes(errs.data)
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
        console_text = console.read_text(errors="replace") if console.exists() else ""
        qemu_text = qemu_log.read_text(errors="replace") if qemu_log.exists() else ""
        shutil.rmtree(tmp, ignore_errors=True)

    if timed_out:
        code = EXIT_TIMEOUT
        say(f"labvm: timeout after {timeout} s, VM killed")
    elif rc is None:
        code = EXIT_VM_DIED
        qrc = proc.returncode if proc is not None else None
        say(f"labvm: the VM stopped without an exit status (qemu exit {qrc})")
        lines = (qemu_text + console_text).splitlines()
        keep = [ln for ln in lines[:-25] if "Kernel panic" in ln or "labvm stage1" in ln]
        tail = "\n".join(keep + lines[-25:])
        say(f"labvm: last console lines:\n{tail}")
    else:
        code = rc
    if verbose:
        say(console_text.rstrip())
        prep = t0 - t_prep
        boot = f"{boot_s:.2f}" if boot_s is not None else "-"
        say(f"labvm: prepare {prep:.2f} s, boot to command {boot} s, total {total_s:.2f} s")
    return LabResult(
        returncode=code, stdout=out_b, stderr=err_b, console=console_text,
        timed_out=timed_out, boot_s=boot_s, total_s=total_s, accel=accel_used,
        qemu_pid=proc.pid if proc is not None else None, qemu_argv=qemu_argv,
    )  # fmt: skip


# ---------------------------------------------------------------------------- CLI


def _parse_size_mib(text: str) -> int:
    m = re.fullmatch(r"(\d+)([MmGg]?)i?[Bb]?", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 1024, 512M, 2G)")
    n = int(m.group(1))
    return n * 1024 if m.group(2).lower() == "g" else n


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lab.labvm",
        description="Run CMD as root in a throw-away VM (host root read-only + tmpfs overlay, "
        "cgroup v2 with memory controller, PSI). Exit status: CMD's, 124 on timeout, "
        "125 if the VM died without one.",
    )
    p.add_argument("--mem", type=_parse_size_mib, default=1024, help="VM memory (MiB, or 2G)")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--timeout", type=float, default=None, help="seconds, boot included")
    p.add_argument("--zram", metavar="SIZE", help="zram swap of SIZE (e.g. 512M)")
    p.add_argument("--systemd", action="store_true", help="systemd as PID 1 (slow, ~10 s)")
    p.add_argument("--rw", action="append", default=[], metavar="DIR",
                   help="share DIR read-write (same path in the VM)")  # fmt: skip
    p.add_argument("--module", action="append", default=[], metavar="NAME",
                   help="load kernel module NAME (and its dependencies)")  # fmt: skip
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=None)
    p.add_argument("--prepare", action="store_true", help="only fetch/build the cache")
    p.add_argument("-v", "--verbose", action="store_true", help="qemu argv, console, timings")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    try:
        if args.prepare:
            kernel, image, initrd = prepare(lambda s: print(s, file=sys.stderr))
            print(f"kernel {kernel.version}\nimage {image}\ninitrd {initrd}")
            print(f"accel {choose_accel(args.accel)} ({kvm_status()[1]})")
            return 0
        if not cmd:
            p.error("no command given")
        res = run(
            cmd, mem_mib=args.mem, cpus=args.cpus, timeout=args.timeout, zram=args.zram,
            systemd=args.systemd, rw=args.rw, modules=args.module,
            stdout=sys.stdout.buffer, stderr=sys.stderr.buffer, accel=args.accel,
            verbose=args.verbose,
        )  # fmt: skip
    except CommandNotFound as e:
        print(f"labvm: {e}", file=sys.stderr)
        return 127
    except LabError as e:
        print(f"labvm: {e}", file=sys.stderr)
        return EXIT_VM_DIED
    except _Terminated as t:
        return 128 + t.signum
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
