"""`mreaper install-files`: the systemd unit, its slice and the commented default
configuration that ship inside the package (mreaper/data/), written to a system (or
under --root, for an image or a package build).

For a pip-installed mreaper, what contrib/install.sh and the Debian package do by
themselves.  It writes files and says which; it never runs systemctl.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from importlib import resources

DATA = ("mreaper.service", "mreaper.slice", "mreaper.toml")
EXIT_USAGE = 2
EXIT_IO = 1


def data(name: str) -> bytes:
    """A file of mreaper/data/, as packaged."""
    return (resources.files("mreaper") / "data" / name).read_bytes()


def default_exec() -> str:
    """The mreaper this interpreter runs: the console script beside it (a venv's bin/,
    /usr/bin), else `python -m mreaper` with this very interpreter."""
    script = os.path.join(os.path.dirname(sys.executable), "mreaper")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return script
    return f"{shlex.quote(sys.executable)} -m mreaper"


def unit_text(exec_start: str) -> bytes:
    """The packaged unit with ExecStart= pointing at `exec_start`."""
    out = []
    for line in data("mreaper.service").decode().splitlines(keepends=True):
        out.append(f"ExecStart={exec_start} run\n" if line.startswith("ExecStart=") else line)
    return "".join(out).encode()


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("install-files",
                       help="install the packaged systemd unit, slice and default "
                            "configuration (an existing configuration is kept)")
    p.add_argument("--root", default="/", metavar="DIR",
                   help="install under DIR instead of / (an image, a package build)")
    p.add_argument("--exec", dest="exec_path", metavar="CMD",
                   help="the command ExecStart= runs, without 'run' (default: the mreaper "
                        "of this Python)")


def _write(path: str, content: bytes) -> None:
    """Atomically, root-owned 0644 (the daemon refuses a config others may change)."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, content)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def cmd_install_files(args: argparse.Namespace) -> int:
    root = args.root
    if not os.path.isabs(root) or not os.path.isdir(root):
        print(f"mreaper install-files: --root {root!r}: an existing directory, given as an "
              "absolute path", file=sys.stderr)
        return EXIT_USAGE
    exec_start = args.exec_path or default_exec()
    if not exec_start.startswith("/"):
        print(f"mreaper install-files: --exec {exec_start!r}: an absolute path (systemd "
              "runs ExecStart= without a search path)", file=sys.stderr)
        return EXIT_USAGE
    units = os.path.join(root, "etc/systemd/system")
    conf = os.path.join(root, "etc/mreaper/mreaper.toml")
    try:
        _write(os.path.join(units, "mreaper.service"), unit_text(exec_start))
        print(f"wrote {units}/mreaper.service (ExecStart={exec_start} run)")
        _write(os.path.join(units, "mreaper.slice"), data("mreaper.slice"))
        print(f"wrote {units}/mreaper.slice")
        if os.path.lexists(conf):
            print(f"kept {conf} (check it: mreaper config --config {conf})")
        else:
            _write(conf, data("mreaper.toml"))
            print(f"wrote {conf} (the built-in defaults, commented out)")
    except OSError as e:
        print(f"mreaper install-files: {e.filename}: {e.strerror}", file=sys.stderr)
        return EXIT_IO
    if root == "/":
        print("then: systemctl daemon-reload && systemctl enable --now mreaper.service")
    return 0
