"""contrib/install.sh with a temporary prefix, unit and configuration directory: an
install leaves a marker in the prefix it created and --uninstall removes that prefix;
--uninstall refuses a prefix it did not create (no marker, or a marker that is a
symlink) and removes nothing there; an install refuses a non-empty directory it did not
create.  (Under systemd as PID 1: tests/lab/test_systemd.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "contrib" / "install.sh"
MARKER = ".created-by-mreaper-install.sh"

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="install.sh runs as root only"),
]


def sh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(INSTALL), *args], check=False, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                        "--wheel-dir", str(out), str(REPO)],
                       check=False, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    (found,) = out.glob("mreaper-*.whl")
    return found


def shared_dir(tmp_path: Path) -> Path:
    """A directory like /usr/local: someone else's files, no marker."""
    shared = tmp_path / "shared"
    (shared / "bin").mkdir(parents=True)
    (shared / "bin" / "someones-tool").write_text("#!/bin/sh\n")
    (shared / "keep.txt").write_text("not mreaper's\n")
    return shared


def contents(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_install_then_uninstall_removes_only_its_own_prefix(tmp_path: Path, wheel: Path) -> None:
    prefix, units, conf = tmp_path / "opt" / "mreaper", tmp_path / "units", tmp_path / "etc"
    p = sh("--prefix", str(prefix), "--wheel", str(wheel), "--python", sys.executable,
           "--unit-dir", str(units), "--conf-dir", str(conf), "--no-enable", "--no-start")
    assert p.returncode == 0, p.stdout + p.stderr
    assert (prefix / MARKER).is_file()
    assert f"ExecStart={prefix}/bin/mreaper run" in (units / "mreaper.service").read_text()
    assert (conf / "mreaper.toml").is_file()
    # installing again (an upgrade) is fine in a marked prefix
    p = sh("--prefix", str(prefix), "--wheel", str(wheel), "--python", sys.executable,
           "--unit-dir", str(units), "--conf-dir", str(conf), "--no-enable", "--no-start")
    assert p.returncode == 0, p.stdout + p.stderr

    p = sh("--uninstall", "--prefix", f"{prefix}/", "--unit-dir", str(units))
    assert p.returncode == 0, p.stdout + p.stderr
    assert not prefix.exists()
    assert (tmp_path / "opt").is_dir()   # its parent stays
    assert not (units / "mreaper.service").exists()
    assert (conf / "mreaper.toml").is_file()  # the configuration is kept


def test_uninstall_refuses_a_prefix_it_did_not_create(tmp_path: Path) -> None:
    shared, units = shared_dir(tmp_path), tmp_path / "units"
    units.mkdir()
    (units / "mreaper.service").write_text("[Service]\nExecStart=/usr/sbin/mreaper run\n")
    before = contents(shared)
    p = sh("--uninstall", "--prefix", str(shared), "--unit-dir", str(units))
    assert p.returncode != 0
    assert f"refusing to remove {shared}" in p.stderr and MARKER in p.stderr
    assert contents(shared) == before
    assert (units / "mreaper.service").exists()


def test_uninstall_refuses_a_symlinked_marker(tmp_path: Path) -> None:
    shared = shared_dir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("")
    (shared / MARKER).symlink_to(elsewhere)
    before = contents(shared)
    p = sh("--uninstall", "--prefix", str(shared), "--unit-dir", str(tmp_path / "units"))
    assert p.returncode != 0, p.stdout
    assert contents(shared) == before


def test_uninstall_refuses_the_root(tmp_path: Path) -> None:
    p = sh("--uninstall", "--prefix", "/", "--unit-dir", str(tmp_path / "units"))
    assert p.returncode != 0 and "never a prefix" in p.stderr


def test_install_refuses_a_non_empty_directory_it_did_not_create(tmp_path: Path,
                                                                 wheel: Path) -> None:
    shared = shared_dir(tmp_path)
    before = contents(shared)
    p = sh("--prefix", str(shared), "--wheel", str(wheel), "--python", sys.executable,
           "--unit-dir", str(tmp_path / "units"), "--conf-dir", str(tmp_path / "etc"),
           "--no-enable", "--no-start")
    assert p.returncode != 0
    assert f"refusing to install into {shared}" in p.stderr
    assert contents(shared) == before
    assert not (tmp_path / "units").exists() and not (tmp_path / "etc").exists()


def install_into(prefix: Path, tmp_path: Path, wheel: Path) -> subprocess.CompletedProcess[str]:
    return sh("--prefix", str(prefix), "--wheel", str(wheel), "--python", sys.executable,
              "--unit-dir", str(tmp_path / "units"), "--conf-dir", str(tmp_path / "etc"),
              "--no-enable", "--no-start")


def test_install_refuses_a_prefix_another_user_owns(tmp_path: Path, wheel: Path) -> None:
    """Root would run what that user can replace: even empty and even marked, refused."""
    prefix = tmp_path / "theirs"
    prefix.mkdir()
    (prefix / MARKER).write_text("planted\n")
    os.chown(prefix, 65534, 65534)
    p = install_into(prefix, tmp_path, wheel)
    assert p.returncode != 0
    assert f"refusing {prefix}: {prefix} is owned by uid 65534" in p.stderr
    assert contents(prefix) == {MARKER}
    assert not (tmp_path / "units").exists()


def test_install_refuses_a_prefix_under_a_directory_others_can_write(tmp_path: Path,
                                                                     wheel: Path) -> None:
    """Not sticky: another user could rename the prefix away and put their own there."""
    shared = tmp_path / "open"
    shared.mkdir()
    shared.chmod(0o777)
    p = install_into(shared / "mreaper", tmp_path, wheel)
    assert p.returncode != 0
    assert f"{shared} is writable by group or others (mode 777" in p.stderr
    assert not (shared / "mreaper").exists()
