"""Running as root, mreaper refuses a config file or hook executable that another user
could change: not owned by root, or writable by group or others."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the check applies to root")


def _config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mreaper.cli", "config", "--config", str(path)],
                          check=False, capture_output=True, text=True, timeout=30)


def _fix(path: Path) -> str:
    return f"mreaper runs as root, so fix it with: chown root:root {path} && chmod go-w {path}"


@pytest.mark.parametrize(("mode", "uid", "problem"), [
    (0o666, 0, "writable by group and others (mode 0666)"),
    (0o646, 0, "writable by others (mode 0646)"),
    (0o664, 0, "writable by group (mode 0664)"),
    (0o644, 65534, "owned by uid 65534, not root"),
    (0o666, 65534, "owned by uid 65534, not root and writable by group and others (mode 0666)"),
])
def test_untrusted_config_is_refused(tmp_path: Path, mode: int, uid: int, problem: str) -> None:
    path = tmp_path / "mreaper.toml"
    path.write_text("[daemon]\nreapers = 2\n")
    os.chmod(path, mode)
    os.chown(path, uid, 0)
    out = _config(path)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"mreaper config: {path}: --config = '{path}': refused: "
                                  f"{problem}; {_fix(path)}")


def test_trusted_config_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "mreaper.toml"
    path.write_text("[daemon]\nreapers = 3\n")
    os.chmod(path, 0o644)
    out = _config(path)
    assert out.returncode == 0, out.stderr
    assert "reapers = 3" in out.stdout


@pytest.mark.parametrize("key", ["pre_kill", "post_kill"])
def test_untrusted_hook_is_refused(tmp_path: Path, key: str) -> None:
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(hook, 0o757)
    path = tmp_path / "mreaper.toml"
    path.write_text(f'[hooks]\n{key} = ["{hook}"]\n')
    out = _config(path)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"mreaper config: {path}: hooks.{key} = '{hook}': refused: "
                                  f"writable by others (mode 0757); {_fix(hook)}")
    os.chmod(hook, 0o755)
    assert _config(path).returncode == 0


def test_hook_must_be_an_executable_file(tmp_path: Path) -> None:
    hook = tmp_path / "notexec"
    hook.write_text("#!/bin/sh\n")
    os.chmod(hook, 0o644)
    path = tmp_path / "mreaper.toml"
    path.write_text(f'[hooks]\npre_kill = ["{hook}", "--flag"]\n')
    out = _config(path)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"mreaper config: {path}: hooks.pre_kill = ['{hook}', "
                                  f"'--flag']: {hook} is not an executable file")
