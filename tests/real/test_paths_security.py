"""Hooks and the configuration reached through paths another user controls (issue 11,
defect 2): a symlink of another user's, a root-owned file in a directory another user
can write or owns, a hook's #! interpreter of another user's; each refused when the
configuration is loaded, and a hook whose path went bad after the load is not run.

The other user is a real one (nobody, uid 65534): the replacement hooks are written by
a process running as nobody, exactly as the attack goes.  Everything lives in a fresh
0755 directory under /tmp (nobody must be able to reach it; pytest's tmp_path is 0700).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mreaper import config, hooks
from mreaper.config import ConfigError
from mreaper.linux import trust

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the checks apply to root")

NOBODY = 65534
FIX = "mreaper runs as root, so fix it with: chown root:root {0} && chmod go-w {0}"
CLI = [sys.executable, "-m", "mreaper.cli"]
ENV = {"PATH": hooks.HOOK_PATH}


@pytest.fixture
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="mreaper-paths-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def hook_file(path: Path, body: str = "exit 0", mode: int = 0o755) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(mode)
    return path


def as_nobody(script: str) -> None:
    """Run a shell script as nobody (what another local user can do)."""
    subprocess.run(["/bin/sh", "-c", script], check=True, timeout=30, user=NOBODY,
                   group=NOBODY, extra_groups=[], cwd="/")


def config_with_hook(base: Path, hook: Path | str, key: str = "pre_kill") -> str:
    cfg = base / "mreaper.toml"
    cfg.write_text(f'[hooks]\n{key} = ["{hook}"]\n')
    cfg.chmod(0o644)
    return str(cfg)


def refused(path: str) -> str:
    with pytest.raises(ConfigError) as e:
        config.load(path, required=True)
    return str(e.value)


# --- hooks at load ------------------------------------------------------------------------


def test_hook_through_a_symlink_another_user_owns_is_refused(base: Path) -> None:
    real = hook_file(base / "notify")
    link = base / "hook"
    link.symlink_to(real)
    os.lchown(link, NOBODY, NOBODY)
    cfg = config_with_hook(base, link)
    assert refused(cfg) == (
        f"{cfg}: hooks.pre_kill = '{link}': refused: symlink {link} on its path is owned by "
        f"uid {NOBODY}, not root; mreaper runs as root, so fix it with: replace {link} with "
        f"a root-owned symlink (chown -h root:root {link}) or name the real path")
    os.lchown(link, 0, 0)  # root's symlink to root's file: fine
    assert config.load(cfg, required=True).pre_kill == (str(link),)


def test_root_hook_in_a_directory_another_user_owns_or_can_write_is_refused(
        base: Path) -> None:
    d = base / "libexec"
    d.mkdir()
    hook = hook_file(d / "notify")
    cfg = config_with_hook(base, hook, "post_kill")
    os.chown(d, NOBODY, NOBODY)
    assert refused(cfg) == (f"{cfg}: hooks.post_kill = '{hook}': refused: directory {d} on "
                            f"its path is owned by uid {NOBODY}, not root; {FIX.format(d)}")
    os.chown(d, 0, 0)
    d.chmod(0o777)
    assert refused(cfg) == (f"{cfg}: hooks.post_kill = '{hook}': refused: directory {d} on "
                            f"its path is writable by group and others (mode 0777); "
                            f"{FIX.format(d)}")
    d.chmod(0o775)
    assert "writable by group (mode 0775)" in refused(cfg)
    d.chmod(0o755)
    assert config.load(cfg, required=True).post_kill == (str(hook),)


def test_hook_through_a_root_symlink_into_another_users_directory_is_refused(
        base: Path) -> None:
    theirs = base / "theirs"
    theirs.mkdir()
    hook = hook_file(theirs / "notify")   # root's file, in nobody's directory
    os.chown(theirs, NOBODY, NOBODY)
    link = base / "hook"
    link.symlink_to(hook)                 # root's symlink
    cfg = config_with_hook(base, link)
    assert f"directory {theirs} on its path is owned by uid {NOBODY}" in refused(cfg)


def test_sticky_directory_like_tmp_is_accepted_for_root_entries_only(base: Path) -> None:
    """A sticky directory (mode 1777, as /tmp) is writable by everyone, but the kernel
    lets nobody else rename or unlink root's entries in it: accepted for root's files,
    and a file of another user's in it is refused for its owner."""
    sticky = base / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    hook = hook_file(sticky / "notify")
    cfg = config_with_hook(base, hook)
    assert config.load(cfg, required=True).pre_kill == (str(hook),)
    # the kernel's side of it: nobody can neither replace nor remove root's entry
    with pytest.raises(subprocess.CalledProcessError):
        as_nobody(f"printf '#!/bin/sh\\ntouch /tmp/pwned\\n' > {sticky}/x && "
                  f"chmod 755 {sticky}/x && mv -f {sticky}/x {hook}")
    assert hook.read_text() == "#!/bin/sh\nexit 0\n"
    os.chown(hook, NOBODY, NOBODY)
    assert f"owned by uid {NOBODY}, not root" in refused(cfg)
    # a hard link there to a root-owned binary: the name is anyone's to have made it
    hook.unlink()
    os.link(shutil.copy("/bin/true", base / "true"), hook)
    assert "one of 2 hard links, in " in refused(cfg)


def test_hook_whose_interpreter_another_user_controls_is_refused(base: Path) -> None:
    theirs = base / "theirs"
    theirs.mkdir()
    interp = theirs / "sh"
    shutil.copy("/bin/sh", interp)
    os.chown(theirs, NOBODY, NOBODY)
    hook = base / "notify"
    hook.write_text(f"#!{interp} -e\nexit 0\n")
    hook.chmod(0o755)
    cfg = config_with_hook(base, hook)
    assert refused(cfg) == (
        f"{cfg}: hooks.pre_kill = '{hook}': refused: the #! interpreter of {hook} ({interp}): "
        f"directory {theirs} on its path is owned by uid {NOBODY}, not root; "
        f"{FIX.format(theirs)}")
    hook.write_text("#!nothing/absolute\n")
    with pytest.raises(ConfigError, match="interpreter 'nothing/absolute' is not an absolute"):
        config.load(cfg, required=True)


# --- hooks at run time ---------------------------------------------------------------------


def test_hook_replaced_after_the_load_is_not_run(base: Path) -> None:
    """Checked at load, then its directory handed to another user, who replaces the
    hook: the next kill must not run the replacement as root."""
    d = base / "libexec"
    d.mkdir()
    canary = base / "canary"
    hook = hook_file(d / "notify", f"touch {canary}")
    cfg = config.load(config_with_hook(base, hook), required=True)
    run = hooks.run_hook("pre_kill", cfg.pre_kill, ENV, 10.0)
    assert run.returncode == 0 and canary.exists()  # the genuine hook runs
    canary.unlink()
    pwned = base / "pwned"
    os.chown(d, NOBODY, NOBODY)   # the admin's mistake
    as_nobody(f"printf '#!/bin/sh\\nid -u > {pwned}\\n' > {d}/new && chmod 755 {d}/new && "
              f"mv -f {d}/new {hook}")
    run = hooks.run_hook("pre_kill", cfg.pre_kill, ENV, 10.0)
    assert not pwned.exists(), "the replacement ran as uid " + pwned.read_text().strip()
    assert run.pid is None and run.returncode is None
    assert run.error == (f"refused: directory {d} on its path is owned by uid {NOBODY}, not "
                         f"root; {FIX.format(d)}")


def test_hook_made_writable_after_the_load_is_not_run(base: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    canary = base / "canary"
    hook = hook_file(base / "notify", f"touch {canary}")
    cfg = config.load(config_with_hook(base, hook), required=True)
    hook.chmod(0o777)
    run = hooks.run_hook("post_kill", cfg.pre_kill, ENV, 10.0)
    assert run.pid is None and not canary.exists()
    assert f"post_kill hook {hook} not run: refused: writable by group and others " \
           "(mode 0777)" in caplog.text


# --- the configuration file ---------------------------------------------------------------


def test_config_in_a_directory_another_user_owns_is_refused(base: Path) -> None:
    d = base / "etc"
    d.mkdir()
    cfg = d / "mreaper.toml"
    cfg.write_text("[daemon]\nreapers = 3\n")
    cfg.chmod(0o644)
    os.chown(d, NOBODY, NOBODY)
    assert refused(str(cfg)) == (f"{cfg}: --config = '{cfg}': refused: directory {d} on its "
                                 f"path is owned by uid {NOBODY}, not root; {FIX.format(d)}")
    os.chown(d, 0, 0)
    d.chmod(0o757)
    assert "writable by others (mode 0757)" in refused(str(cfg))
    d.chmod(0o755)
    assert config.load(str(cfg), required=True).reapers == 3


def test_config_through_symlinks(base: Path) -> None:
    real = base / "real.toml"
    real.write_text("[daemon]\nreapers = 4\n")
    real.chmod(0o644)
    link = base / "mreaper.toml"
    link.symlink_to("real.toml")  # relative, root's: fine
    assert config.load(str(link), required=True).reapers == 4
    os.lchown(link, NOBODY, NOBODY)
    assert f"symlink {link} on its path is owned by uid {NOBODY}" in refused(str(link))
    # a root symlink to a root file in another user's directory
    theirs = base / "theirs"
    theirs.mkdir()
    shutil.copy(real, theirs / "x.toml")
    os.chown(theirs, NOBODY, NOBODY)
    link2 = base / "m2.toml"
    link2.symlink_to(theirs / "x.toml")
    assert f"directory {theirs} on its path is owned by uid {NOBODY}" in refused(str(link2))
    # a symlink loop is an error, not a hang
    loop = base / "loop.toml"
    loop.symlink_to(loop)
    assert "cannot read it: Too many levels of symbolic links" in refused(str(loop))


def test_sighup_reload_refuses_a_config_whose_directory_went_bad(base: Path) -> None:
    """The daemon keeps its configuration when the file's directory turns out to be
    another user's at a SIGHUP (the same load as at start)."""
    d = base / "etc"
    d.mkdir()
    cfg = d / "mreaper.toml"
    cfg.write_text(textwrap.dedent("""
        [memory]
        warn = "48M"
        term = "32M"
        kill = "16M"
        [daemon]
        dry_run = true
        [status]
        socket = ""
    """))
    cfg.chmod(0o644)
    log = base / "daemon.log"
    with log.open("w") as err:
        proc = subprocess.Popen([*CLI, "run", "--config", str(cfg), "--psi-warn", "off",
                                 "--psi-kill", "off"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(log, "running", proc)
        os.chown(d, NOBODY, NOBODY)
        as_nobody(f"printf '[daemon]\\ndry_run = false\\n' > {d}/new && mv -f {d}/new {cfg}")
        proc.send_signal(signal.SIGHUP)
        wait_for(log, "reload refused", proc)
        assert (f"reload refused, keeping the running configuration: {cfg}: --config = "
                f"'{cfg}': refused: directory {d} on its path is owned by uid {NOBODY}"
                ) in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert "configuration reloaded" not in log.read_text()


def wait_for(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"no {text!r} in:\n{log.read_text()}"
        time.sleep(0.05)


# --- the walk itself ----------------------------------------------------------------------


def test_resolve_walks_like_the_kernel(base: Path) -> None:
    (base / "a" / "b").mkdir(parents=True)
    f = base / "a" / "b" / "f"
    f.write_text("x")
    f.chmod(0o644)
    (base / "l1").symlink_to("a/b")
    (base / "a" / "up").symlink_to("..")
    assert trust.resolve(f"{base}/l1/f").path == str(f)
    assert trust.resolve(f"{base}/a/up/a/./b/../b/f").path == str(f)
    assert stat.S_ISREG(trust.resolve(f"{base}/l1/f").st.st_mode)
    with pytest.raises(FileNotFoundError):
        trust.resolve(f"{base}/missing/f")
    with pytest.raises(NotADirectoryError):
        trust.resolve(f"{f}/x")
