"""Packaging metadata held together: one version in pyproject.toml, mreaper.__version__,
the newest CHANGELOG.md entry and debian/changelog; the long description (README.md)
has no relative link (dead on a package index); every Debian build dependency is one
scripts/install-deps installs; `python -m mreaper` runs."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import mreaper

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def test_one_version_everywhere() -> None:
    version = PROJECT["version"]
    assert mreaper.__version__ == version
    changelog = re.search(r"(?m)^## (\S+) - \d{4}-\d\d-\d\d$",
                          (REPO / "CHANGELOG.md").read_text())
    assert changelog and changelog.group(1) == version
    debian = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    assert debian.startswith(f"mreaper ({version}) ")


def test_long_description_has_no_relative_link() -> None:
    assert PROJECT["readme"] == "README.md"
    text = (REPO / "README.md").read_text()
    targets = re.findall(r"\]\(([^)\s]+)", text) + re.findall(r"(?m)^\[[^\]]+\]:\s*(\S+)", text)
    targets += re.findall(r"""(?:href|src)=["']([^"']+)""", text)
    relative = [t for t in targets if not re.match(r"(https?://|mailto:|#)", t)]
    assert relative == []


def test_index_metadata() -> None:
    assert PROJECT["license"] == "MIT"
    classifiers = PROJECT["classifiers"]
    assert "Operating System :: POSIX :: Linux" in classifiers
    assert "Environment :: No Input/Output (Daemon)" in classifiers
    assert any(c.startswith("Development Status ::") for c in classifiers)
    assert "process_mrelease" in PROJECT["keywords"]
    # no invented address: [project.urls] only once the project has a public one
    assert "urls" not in PROJECT


def test_debian_build_dependencies_are_installed_by_install_deps() -> None:
    control = (REPO / "debian" / "control").read_text()
    m = re.search(r"(?ms)^Build-Depends:(.*?)^\S", control)
    assert m
    needed = {re.sub(r"\s*\(.*", "", d.strip()) for d in m.group(1).split(",") if d.strip()}
    needed.discard("debhelper-compat")  # a virtual package debhelper provides
    script = (REPO / "scripts" / "install-deps").read_text()
    listed = set(" ".join(re.findall(r'DEB_PACKAGES="([^"]*)"', script)).split())
    assert needed | {"debhelper", "lintian", "dpkg-dev"} <= listed


def test_python_dash_m_mreaper() -> None:
    p = subprocess.run([sys.executable, "-m", "mreaper", "--version"], check=False,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == f"mreaper {mreaper.__version__}", p.stderr
