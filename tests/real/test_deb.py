"""The Debian package, built as `make deb` builds it (scripts/build-deb, dh-python and
pybuild from debian/): lintian finds no error, the file list is what docs/install.md
promises, runtime dependencies are python3 and the library's requirements (python3-regex),
Prometheus as a Recommends, the
configuration is a conffile, and the packaged command runs on the system python3 with
nothing but the package's files.  (Installed under systemd as PID 1, in the lab VM:
tests/lab/test_deb_systemd.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def run(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=600,
                          **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="session")
def deb() -> Path:
    p = run(str(REPO / "scripts" / "build-deb"))
    assert p.returncode == 0, p.stdout + p.stderr
    path = REPO / p.stdout.strip().splitlines()[-1]
    assert path.name == f"mreaper_{VERSION}_all.deb"
    return path


@pytest.fixture(scope="session")
def files(deb: Path) -> set[str]:
    p = run("dpkg-deb", "--contents", str(deb))
    assert p.returncode == 0, p.stderr
    # "-rw-r--r-- root/root 108 2026-12-02 07:53 ./usr/lib/..." (a symlink adds " -> x")
    return {line.split(None, 5)[5].split(" -> ")[0].removeprefix(".")
            for line in p.stdout.splitlines()}


def field(deb: Path, name: str) -> str:
    p = run("dpkg-deb", "--field", str(deb), name)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_lintian_reports_no_error(deb: Path) -> None:
    p = run("lintian", "--fail-on", "error", "--no-tag-display-limit", str(deb))
    assert p.returncode == 0, p.stdout + p.stderr
    assert not re.search(r"(?m)^E: ", p.stdout), p.stdout


def test_file_list(files: set[str]) -> None:
    site = "/usr/lib/python3/dist-packages/mreaper"
    expected = {
        "/usr/sbin/mreaper",
        "/lib/systemd/system/mreaper.service",
        "/lib/systemd/system/mreaper.slice",
        "/etc/mreaper/mreaper.toml",
        "/usr/share/man/man8/mreaper.8.gz",
        "/usr/share/man/man5/mreaper.toml.5.gz",
        "/usr/share/bash-completion/completions/mreaper",
        "/usr/share/zsh/vendor-completions/_mreaper",
        "/usr/share/doc/mreaper/copyright",
        "/usr/share/doc/mreaper/changelog.gz",
        "/usr/share/doc/mreaper/README.md.gz",
        "/usr/share/doc/mreaper/configuration.md.gz",
        "/usr/share/doc/mreaper/systemd.md.gz",
        f"{site}/__init__.py", f"{site}/__main__.py", f"{site}/cli.py", f"{site}/daemon.py",
        f"{site}/linux/syscalls.py", f"{site}/py.typed",
        f"{site}/data/mreaper.service", f"{site}/data/mreaper.slice",
        f"{site}/data/mreaper.toml",
        f"/usr/lib/python3/dist-packages/mreaper-{VERSION}.dist-info/METADATA",
    }
    assert expected <= files, sorted(expected - files)
    # every module of the tree is in the package, and nothing from outside src/mreaper
    modules = {f"{site}/{p.relative_to(REPO / 'src' / 'mreaper').as_posix()}"
               for p in (REPO / "src" / "mreaper").rglob("*.py")}
    assert modules <= files, sorted(modules - files)
    assert not [f for f in files if "/tests/" in f or "__pycache__" in f or "/usr/bin/" in f]


def test_dependencies_and_conffile(deb: Path, tmp_path: Path) -> None:
    depends = {d.split()[0].split(":")[0] for d in field(deb, "Depends").split(", ")}
    # python3, and what dh_python3 maps the library's requirements to (regex ->
    # python3-regex); nothing else
    requirements = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    mapped = {"python3-" + re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower()
              for r in requirements}
    assert depends == {"python3"} | mapped
    assert field(deb, "Recommends") == "python3-prometheus-client"
    assert field(deb, "Version") == VERSION
    assert field(deb, "Architecture") == "all"
    p = run("dpkg-deb", "--control", str(deb), str(tmp_path / "control"))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "control" / "conffiles").read_text().split() == \
        ["/etc/mreaper/mreaper.toml"]


def test_packaged_unit_runs_usr_sbin_mreaper(deb: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert run("dpkg-deb", "--extract", str(deb), str(root)).returncode == 0
    unit = (root / "lib/systemd/system/mreaper.service").read_text()
    assert re.findall(r"(?m)^ExecStart=.*$", unit) == ["ExecStart=/usr/sbin/mreaper run"]
    assert re.findall(r"(?m)^Documentation=.*$", unit) == \
        ["Documentation=man:mreaper(8) man:mreaper.toml(5)"]
    # the rest of the unit is the one the tests of contrib/systemd hold
    contrib = (REPO / "contrib/systemd/mreaper.service").read_text()
    keep = re.compile(r"(?m)^(?!#|ExecStart=|Documentation=).+$")
    assert keep.findall(unit) == keep.findall(contrib)


def test_packaged_command_runs_on_system_python(deb: Path, tmp_path: Path) -> None:
    """The console script, its shebang the system python3, the library from the package
    only (no venv, no source tree on the path), reading the packaged conffile."""
    root = tmp_path / "root"
    assert run("dpkg-deb", "--extract", str(deb), str(root)).returncode == 0
    script = root / "usr/sbin/mreaper"
    assert script.read_text().splitlines()[0] == "#!/usr/bin/python3"
    env = {"PATH": SYSTEM_PATH, "PYTHONPATH": str(root / "usr/lib/python3/dist-packages")}
    p = run(str(script), "--version", env=env, cwd="/")
    assert p.returncode == 0 and p.stdout.strip() == f"mreaper {VERSION}", p.stdout + p.stderr
    conf = root / "etc/mreaper/mreaper.toml"
    if os.geteuid() == 0:
        os.chown(conf, 0, 0)  # as dpkg would install it (mreaper refuses others' files)
    p = run(str(script), "config", "--config", str(conf), env=env, cwd="/")
    assert p.returncode == 0, p.stderr
    mod = run("/usr/bin/python3", "-c", "import mreaper, sys; print(mreaper.__file__)",
              env=env, cwd="/")
    assert mod.stdout.strip().startswith(str(root)), mod.stdout + mod.stderr
