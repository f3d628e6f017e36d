"""`mreaper install-files --root DIR`: the packaged unit (ExecStart= rewritten), slice
and commented default configuration land under DIR; an existing configuration is kept
byte for byte; bad arguments are refused with the argument named."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from mreaper import install_files
from mreaper.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_installs_unit_slice_and_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["install-files", "--root", str(tmp_path), "--exec", "/usr/sbin/mreaper"]) == 0
    unit = (tmp_path / "etc/systemd/system/mreaper.service").read_text()
    exec_lines = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_lines == ["ExecStart=/usr/sbin/mreaper run"]
    # everything else is the contrib unit as it is
    contrib = (REPO / "contrib/systemd/mreaper.service").read_text()
    assert [line for line in unit.splitlines() if not line.startswith("ExecStart=")] == \
        [line for line in contrib.splitlines() if not line.startswith("ExecStart=")]
    assert (tmp_path / "etc/systemd/system/mreaper.slice").read_bytes() == \
        (REPO / "contrib/systemd/mreaper.slice").read_bytes()
    conf = tmp_path / "etc/mreaper/mreaper.toml"
    assert conf.read_bytes() == install_files.data("mreaper.toml")
    for path in (conf, tmp_path / "etc/systemd/system/mreaper.service"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        assert path.stat().st_uid == os.geteuid()
    out = capsys.readouterr().out
    assert "wrote" in out and "mreaper.toml" in out


def test_keeps_an_existing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "etc/mreaper/mreaper.toml"
    conf.parent.mkdir(parents=True)
    conf.write_text("[memory]\nkill = \"1G\"\n")
    assert main(["install-files", "--root", str(tmp_path), "--exec", "/x/mreaper"]) == 0
    assert conf.read_text() == "[memory]\nkill = \"1G\"\n"
    assert f"kept {conf}" in capsys.readouterr().out


def test_default_exec_is_this_pythons_mreaper(tmp_path: Path) -> None:
    assert main(["install-files", "--root", str(tmp_path)]) == 0
    unit = (tmp_path / "etc/systemd/system/mreaper.service").read_text()
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    assert line == f"ExecStart={install_files.default_exec()} run"
    assert install_files.default_exec().startswith("/")


@pytest.mark.parametrize("argv, message", [
    (["--root", "relative/dir"], "--root 'relative/dir'"),
    (["--root", "/no/such/dir/here"], "--root '/no/such/dir/here'"),
    (["--exec", "mreaper"], "--exec 'mreaper'"),
])
def test_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               argv: list[str], message: str) -> None:
    if "--root" not in argv:
        argv = [*argv, "--root", str(tmp_path)]
    assert main(["install-files", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "etc").exists()
