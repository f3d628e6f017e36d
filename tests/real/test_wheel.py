"""The wheel as pip builds it: the package data (systemd unit, slice, default
configuration) inside it, the index metadata, and, installed in a fresh venv,
`python -m mreaper install-files` writing the unit and configuration from it."""

from __future__ import annotations

import email.parser
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=False, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    p = run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
            str(out), str(REPO))
    assert p.returncode == 0, p.stdout + p.stderr
    (found,) = out.glob(f"mreaper-{VERSION}-*.whl")
    return found


def test_wheel_carries_the_unit_and_default_config(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        for name, source in (("mreaper.service", "contrib/systemd/mreaper.service"),
                             ("mreaper.slice", "contrib/systemd/mreaper.slice"),
                             ("mreaper.toml", "src/mreaper/data/mreaper.toml")):
            assert z.read(f"mreaper/data/{name}") == (REPO / source).read_bytes()
        assert "mreaper/__main__.py" in z.namelist()
        assert "mreaper/py.typed" in z.namelist()
        meta = email.parser.Parser().parsestr(
            z.read(f"mreaper-{VERSION}.dist-info/METADATA").decode())
    assert meta["Version"] == VERSION
    assert meta["License-Expression"] == "MIT"
    assert "Operating System :: POSIX :: Linux" in meta.get_all("Classifier")
    assert "process_mrelease" in meta["Keywords"]
    assert "](docs/" not in str(meta.get_payload())   # the README, no relative link


def test_installed_wheel_installs_its_files(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", str(venv)).returncode == 0
    p = run(str(venv / "bin" / "pip"), "install", "--quiet", "--no-index", "--no-deps",
            str(wheel))
    assert p.returncode == 0, p.stdout + p.stderr
    root = tmp_path / "root"
    root.mkdir()
    p = run(str(venv / "bin" / "python"), "-m", "mreaper", "install-files", "--root", str(root))
    assert p.returncode == 0, p.stdout + p.stderr
    unit = (root / "etc/systemd/system/mreaper.service").read_text()
    assert f"ExecStart={venv}/bin/mreaper run" in unit.splitlines()
    assert (root / "etc/mreaper/mreaper.toml").read_bytes() == \
        (REPO / "src/mreaper/data/mreaper.toml").read_bytes()
