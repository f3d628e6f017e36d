"""The status socket, `mreaper status` and `mreaper top`, on real sockets and processes.

The server is checked with a fake provider (its answers, modes, SO_PEERCRED refusal of a
uid-65534 client, a silent client that must not block the next one, stale and live
sockets at its path); the commands against that server, against no server (computed
locally) and against a real `mreaper run`; `top` also in a real terminal (tmux), where
the screen is read back and q and Ctrl-C must leave the terminal as they found it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mreaper import status
from mreaper.reap import Holdings, KillReport, Mrelease, SignalSent

MiB = 1 << 20
GiB = 1 << 30
CLI = [sys.executable, "-m", "mreaper.cli"]
NOBODY = 65534
NOW = time.time()

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: setuid to nobody")


# --- a realistic status, as Daemon.status() gives it --------------------------------------


def _kill(pid: int = 4242, name: str = "mr-leak", outcome: Mrelease = Mrelease.REAPED
          ) -> dict[str, object]:
    return KillReport(
        pid=pid, starttime=1, name=name, cmdline=("python3", "-c", "leak"), uid=1000,
        cgroup="/user.slice", memcg="/user.slice",
        holdings=Holdings(vm_rss=700 * MiB, rss_anon=690 * MiB, rss_file=10 * MiB,
                          rss_shmem=0, vm_swap=0),
        reason="kill: MemAvailable 300 MiB <= 400 MiB", wall_time=NOW - 5,
        signals=(SignalSent("SIGKILL", 0.0),), mrelease=outcome, mrelease_errno="0",
        mrelease_attempts=1, mrelease_s=0.012, kill_to_free_s=0.013, kill_to_exit_s=0.02,
        exited=True, freed_bytes=689 * MiB, freed_source="MemAvailable").to_dict()


def fake_status() -> dict[str, Any]:
    return {
        "pid": 4242, "dry_run": False, "config": "/etc/mreaper/mreaper.toml",
        "scopes": [
            {"scope": "machine", "severity": "warn", "reason": "warn: MemAvailable 3000 MiB",
             "mem_total": 16 * GiB, "mem_available": 3 * GiB, "swap_total": 0,
             "swap_free": 0, "levels": {"warn": 4 * GiB, "term": 2 * GiB, "kill": 1 * GiB},
             "swap_levels": {"warn": 0, "term": 0, "kill": 0}},
            {"scope": "builds", "severity": "none", "reason": "",
             "cgroup": "/sys/fs/cgroup/builds.slice", "current": 1 * GiB, "limit": 4 * GiB,
             "headroom": 3 * GiB, "events": {"oom": 0, "high": 2},
             "levels": {"warn": 1 * GiB, "term": None, "kill": 256 * MiB}},
        ],
        "candidates": [
            {"pid": 777, "name": "chromium", "rss": 2 * GiB, "oom_score": 900, "score": 1200,
             "excluded": None, "rules": ["rule 1 (prefer name='chrom'): +300"]},
            {"pid": 778, "name": "sshd", "rss": 8 * MiB, "oom_score": 0, "score": 0,
             "excluded": "protected by rule 2 (protect name='sshd')", "rules": []},
        ],
        "kills": [_kill(4241, "mr-old", Mrelease.EXITED_FIRST), _kill()],
    }


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A fresh directory under /tmp that does not exist yet (the server makes it 0700).
    Not pytest's tmp_path: that sits in a 0700 tree the nobody client could not reach."""
    base = Path(tempfile.mkdtemp(prefix="mreaper-status-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base / "run"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def empty_config(tmp_path: Path) -> str:
    """A configuration with nothing in it: the built-in levels and rules."""
    path = tmp_path / "empty.toml"
    path.write_text("")
    path.chmod(0o644)
    return str(path)


@pytest.fixture
def server(sockdir: Path) -> Iterator[status.StatusServer]:
    srv = status.StatusServer(str(sockdir / "status.sock"), fake_status, timeout=1.0)
    with srv:
        yield srv


def raw_request(path: str, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(data)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
    return out


def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], check=False, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=env)


# --- the server ---------------------------------------------------------------------------


def test_answers_root_with_the_providers_dict(server: status.StatusServer) -> None:
    assert os.geteuid() in server.allowed_uids
    answer = status.query(server.path)
    assert answer == json.loads(json.dumps(fake_status()))
    assert answer["scopes"][0]["mem_available"] == 3 * GiB
    assert answer["kills"][-1]["mrelease"] == "reaped"
    assert status.query(server.path, cmd="ping") == {"pong": True, "pid": os.getpid()}
    assert server.served == 1


def test_bad_requests_get_an_error_line(server: status.StatusServer) -> None:
    def ask(data: bytes) -> dict[str, Any]:
        out = raw_request(server.path, data)
        assert out.endswith(b"\n") and out.count(b"\n") == 1
        return dict(json.loads(out))

    assert "unknown command 'dump'" in ask(b'{"cmd": "dump"}\n')["error"]
    assert ask(b"status please\n")["error"].startswith("bad request: not JSON")
    assert ask(b"x" * (status.MAX_REQUEST + 10))["error"] == \
        f"request longer than {status.MAX_REQUEST} bytes"
    # A request without the newline still counts once the client half-closes.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(server.path)
        s.sendall(b'{"cmd": "ping"}')
        s.shutdown(socket.SHUT_WR)
        assert json.loads(s.recv(65536))["pong"] is True


def test_socket_is_0600_in_a_0700_directory_and_removed_on_close(sockdir: Path) -> None:
    path = sockdir / "status.sock"
    old_umask = os.umask(0o022)
    try:
        srv = status.StatusServer(str(path), fake_status).start()
    finally:
        os.umask(old_umask)
    try:
        st = path.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(sockdir.stat().st_mode) == 0o700
        assert os.umask(0o022) == 0o022  # the server put the process umask back
    finally:
        srv.close()
    assert not path.exists()
    srv.close()  # idempotent


def test_existing_directory_is_left_as_it_is(sockdir: Path) -> None:
    sockdir.mkdir(mode=0o755)
    sockdir.chmod(0o755)
    with status.StatusServer(str(sockdir / "s.sock"), fake_status) as srv:
        assert stat.S_IMODE(sockdir.stat().st_mode) == 0o755
        assert stat.S_IMODE(os.lstat(srv.path).st_mode) == 0o600


_NOBODY_CLIENT = textwrap.dedent("""
    import json, os, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(sys.argv[1])
    except OSError as e:
        print(json.dumps({"uid": os.getuid(), "connect_errno": e.errno}))
        sys.exit(0)
    s.sendall(b'{"cmd": "status"}\\n')
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    print(json.dumps({"uid": os.getuid(), "answer": out.decode()}))
""")


def _as_nobody(path: str) -> dict[str, Any]:
    """Connect from a child that is uid/gid 65534 (system python: the venv may be in a
    directory nobody cannot enter)."""
    p = subprocess.run(["/usr/bin/python3", "-c", _NOBODY_CLIENT, path], check=False,
                       capture_output=True, text=True, timeout=30, user=NOBODY, group=NOBODY,
                       extra_groups=[], cwd="/")
    assert p.returncode == 0, p.stderr
    return dict(json.loads(p.stdout))


@needs_root
def test_non_root_client_refused_by_peercred_even_on_a_0666_socket(
        server: status.StatusServer, sockdir: Path) -> None:
    # As created, the kernel keeps nobody out (directory 0700, socket 0600).
    assert _as_nobody(server.path) == {"uid": NOBODY, "connect_errno": 13}
    # Loosened: the kernel lets nobody connect, SO_PEERCRED still refuses.
    sockdir.chmod(0o755)
    os.chmod(server.path, 0o666)
    result = _as_nobody(server.path)
    assert result["uid"] == NOBODY
    assert json.loads(result["answer"]) == {"error": "permission denied: root only"}
    assert server.refused == 1 and server.served == 0
    assert "mem_available" not in result["answer"]
    # root is still served
    assert status.query(server.path)["pid"] == 4242


def test_silent_clients_do_not_block_the_next_one(server: status.StatusServer) -> None:
    silent = []
    for _ in range(3):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(server.path)
        silent.append(s)
    try:
        t0 = time.monotonic()
        assert status.query(server.path, timeout=5.0)["pid"] == 4242
        assert time.monotonic() - t0 < 0.5  # not after the silent ones' timeout (1 s)
        # Each silent client is told why and closed at its deadline.
        for s in silent:
            s.settimeout(5)
            assert json.loads(s.recv(4096)) == {"error": "no complete request within 1 s"}
            assert s.recv(4096) == b""
    finally:
        for s in silent:
            s.close()


def test_a_flood_of_silent_clients_drops_the_oldest(sockdir: Path) -> None:
    with status.StatusServer(str(sockdir / "s.sock"), fake_status, timeout=30,
                             max_clients=4) as srv:
        silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(6)]
        try:
            for s in silent:
                s.connect(srv.path)
            t0 = time.monotonic()
            assert status.query(srv.path, timeout=5.0)["pid"] == 4242
            assert time.monotonic() - t0 < 1.0
        finally:
            for s in silent:
                s.close()


def test_provider_failure_is_an_answer_not_a_dead_server(sockdir: Path) -> None:
    calls = []

    def provider() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return {"ok": True, "odd": {1}}  # not JSON: sent as its str()

    with status.StatusServer(str(sockdir / "s.sock"), provider) as srv:
        assert status.query(srv.path) == {"error": "status failed: RuntimeError: boom"}
        assert status.query(srv.path) == {"ok": True, "odd": "{1}"}


def test_stale_socket_replaced_live_one_and_other_files_kept(sockdir: Path) -> None:
    sockdir.mkdir(mode=0o700)
    path = str(sockdir / "status.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays: a daemon that died without cleaning up
    with pytest.raises(status.NoDaemon):
        status.query(path)
    with status.StatusServer(path, fake_status) as srv:
        assert status.query(path)["pid"] == 4242
        with pytest.raises(OSError, match="another server answers"):
            status.StatusServer(path, fake_status).start()
        assert status.query(path)["pid"] == 4242  # the live one was not disturbed
        assert srv.served == 2
    other = sockdir / "plain"
    other.write_text("keep me")
    with pytest.raises(OSError, match="not a socket"):
        status.StatusServer(str(other), fake_status).start()
    assert other.read_text() == "keep me"


def test_query_errors(sockdir: Path) -> None:
    with pytest.raises(status.NoDaemon):
        status.query(str(sockdir / "missing.sock"))
    sockdir.mkdir()
    path = str(sockdir / "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen(1)  # accepts (in the backlog) but never answers
    try:
        t0 = time.monotonic()
        with pytest.raises(status.StatusError, match=r"no answer within 0\.3 s"):
            status.query(path, timeout=0.3)
        assert time.monotonic() - t0 < 2
    finally:
        mute.close()


def test_serve_is_off_for_an_empty_path_and_survives_a_bad_one(
        caplog: pytest.LogCaptureFixture) -> None:
    assert status.serve("", fake_status) is None
    assert status.serve("/proc/no/such/dir/s.sock", fake_status) is None
    assert "status socket /proc/no/such/dir/s.sock unavailable" in caplog.text


def test_summary_line() -> None:
    line = status.summary(fake_status())
    assert line == ("machine WARN, MemAvailable 3.0 GiB; builds ok, headroom 3.0 GiB; "
                    "2 kills, last 4242 'mr-leak' reaped")
    assert status.summary({"scopes": [], "kills": []}) == "no kills"


# --- mreaper status -----------------------------------------------------------------------


def test_status_with_no_daemon_computes_locally(sockdir: Path, empty_config: str) -> None:
    path = str(sockdir / "none.sock")
    p = run_cli("status", "--socket", path, "--config", empty_config)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"no daemon running at {path}: computed locally"
    assert lines[1].startswith("machine: ")
    with open("/proc/meminfo") as f:
        total_kib = int(next(x for x in f if x.startswith("MemTotal:")).split()[1])
    m = re.search(r"MemAvailable (\S+ \S+) of (\S+ \S+) \(([\d.]+)%\)", p.stdout)
    assert m is not None, p.stdout
    assert m.group(2) == f"{total_kib * 1024 / GiB:.1f} GiB"
    assert 0 < float(m.group(3)) <= 100
    # the built-in levels (percentages of MemTotal) and the distance to each
    assert re.search(r"warn \S+ \S+ \((\S+ \S+ above|REACHED)", p.stdout)
    assert "top candidates:" in p.stdout
    assert re.search(r"^\s+1\s+\d+\s+\S", p.stdout, re.M)  # at least one ranked process
    assert "last kills: known only to the daemon" in p.stdout

    j = run_cli("status", "--socket", path, "--config", empty_config, "--json")
    st = json.loads(j.stdout)
    assert st["source"] == "local" and st["note"] == lines[0]
    assert st["scopes"][0]["mem_total"] == total_kib * 1024
    assert st["scopes"][0]["levels"]["warn"] == total_kib * 1024 * 10 // 100
    assert st["candidates"] and all("pid" in c for c in st["candidates"])


def test_status_socket_off_in_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text('[status]\nsocket = ""\n')
    p = run_cli("status", "--config", str(cfg))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == f"the status socket is off in {cfg}: computed locally"


def test_status_from_a_server(server: status.StatusServer) -> None:
    p = run_cli("status", "--socket", server.path)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    lines = out.splitlines()
    assert lines[0] == (f"mreaper daemon 4242 at {server.path} "
                        "(config: /etc/mreaper/mreaper.toml)")
    assert "machine: WARN: warn: MemAvailable 3000 MiB" in out
    assert "MemAvailable 3.0 GiB of 16.0 GiB (18.8%)" in out
    assert ("warn 4.0 GiB (REACHED, 1.0 GiB below)  term 2.0 GiB (1.0 GiB above)  "
            "kill 1.0 GiB (2.0 GiB above)") in out
    assert "builds: ok: no level held" in out
    assert "cgroup  /sys/fs/cgroup/builds.slice: current 1.0 GiB, limit 4.0 GiB, " \
           "headroom 3.0 GiB (75.0%)" in out
    assert "warn 1.0 GiB (2.0 GiB above)  term off  kill 256.0 MiB (2.8 GiB above)" in out
    assert re.search(r"1\s+777\s+chromium\s+2\.0 GiB\s+900\s+1200\s+rule 1", out)
    assert re.search(r"-\s+778\s+sshd .*excluded: protected by rule 2", out)
    kills = lines[lines.index("last kills:") + 1:]
    assert len(kills) == 2
    assert "4242 'mr-leak' rss 700.0 MiB; SIGKILL; process_mrelease reaped; freed 689.0 MiB" \
        in kills[0]  # newest first
    assert "4241 'mr-old'" in kills[1] and "exited-first" in kills[1]

    j = run_cli("status", "--socket", server.path, "--json")
    st = json.loads(j.stdout)
    assert st["source"] == "daemon" and st["socket"] == server.path
    assert st["pid"] == 4242 and st["kills"][-1]["pid"] == 4242


def test_status_refused_by_the_daemon_falls_back(sockdir: Path, empty_config: str) -> None:
    with status.StatusServer(str(sockdir / "s.sock"), fake_status,
                             allowed_uids={12345}) as srv:
        p = run_cli("status", "--socket", srv.path, "--config", empty_config)
    assert p.stdout.splitlines()[0] == (f"the daemon at {srv.path} refused: permission denied: "
                                        "root only: computed locally")


# --- mreaper top --------------------------------------------------------------------------


def test_top_once_from_a_server(server: status.StatusServer) -> None:
    env = dict(os.environ, COLUMNS="100", LINES="40")
    p = run_cli("top", "--once", "--socket", server.path, env=env)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert re.fullmatch(r"mreaper top  \d\d:\d\d:\d\d  every 1 s, q quits", lines[0])
    assert lines[1].startswith(f"mreaper daemon 4242 at {server.path} ")
    assert "\x1b" not in p.stdout  # not a terminal: no escapes
    assert all(len(x) <= 100 for x in lines)
    gauge = next(x for x in lines if x.startswith("machine "))
    m = re.search(r"\[([#.WTK]+)\] MemAvailable 3\.0 GiB / 16\.0 GiB  WARN$", gauge)
    assert m is not None, gauge
    bar = m.group(1)
    # 3 of 16 GiB filled; marks at 1/16 (K), 2/16 (T), 4/16 (W): W already past the fill
    assert bar.index("K") < bar.index("T") < bar.rindex("#") < bar.index("W")
    assert abs(bar.count("#") + 2 - round(len(bar) * 3 / 16)) <= 1
    builds = next(x for x in lines if x.startswith("builds "))
    assert "headroom 3.0 GiB / 4.0 GiB  ok" in builds
    assert "top candidates:" in lines and "last kills:" in lines
    assert any("chromium" in x for x in lines)
    assert any("'mr-leak'" in x and "reaped" in x for x in lines)


def test_top_once_computed_locally(sockdir: Path, empty_config: str) -> None:
    path = str(sockdir / "none.sock")
    p = run_cli("top", "--once", "--socket", path, "--config", empty_config,
                env=dict(os.environ, COLUMNS="120", LINES="30"))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert re.fullmatch(r"mreaper top  \d\d:\d\d:\d\d  every 1 s, q quits", lines[0])
    assert lines[1] == f"no daemon running at {path}: computed locally"[:120]
    assert re.match(r"machine      \[[#.WTK]+\] MemAvailable \S+ \S+ / \S+ \S+  "
                    r"(ok|WARN|TERM|KILL)$", lines[2])
    assert len(lines) <= 30


# --- mreaper top in a terminal ------------------------------------------------------------


RC = re.compile(r"^rc=(\d+)$", re.M)


class Tmux:
    """A private tmux server with one 100x30 window running `sh`."""

    def __init__(self, base: Path) -> None:
        self.sock = str(base / "tmux.sock")
        env = dict(os.environ, TERM="xterm-256color", PS1="$ ", ENV="")
        subprocess.run(self.cmd("new-session", "-d", "-x", "100", "-y", "30", "sh"),
                       check=True, env=env, cwd=str(base))

    def cmd(self, *args: str) -> list[str]:
        return ["tmux", "-f", "/dev/null", "-S", self.sock, *args]

    def run(self, *args: str) -> str:
        return subprocess.run(self.cmd(*args), check=True, capture_output=True,
                              text=True).stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p")

    def flags(self) -> tuple[str, str]:
        """(alternate screen on, cursor visible) as tmux knows them: "1"/"0"."""
        out = self.run("display-message", "-p", "#{alternate_on} #{cursor_flag}").split()
        return out[0], out[1]

    def type(self, text: str) -> None:
        """Type `text` literally, then Enter."""
        self.run("send-keys", "-l", text)
        self.run("send-keys", "Enter")

    def key(self, key: str) -> None:
        """Press one key by tmux's name for it ("q", "C-c")."""
        self.run("send-keys", key)

    def tty_modes(self) -> str:
        """`stty -a` of the window's terminal, read from outside."""
        tty = self.run("display-message", "-p", "#{pane_tty}").strip()
        return subprocess.run(["stty", "-F", tty, "-a"], check=True, capture_output=True,
                              text=True).stdout

    def wait(self, check: Callable[[str], bool], what: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if check(screen):
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{what} not on screen within {timeout} s:\n{screen}")

    def kill(self) -> None:
        subprocess.run(self.cmd("kill-server"), check=False, capture_output=True)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.fail("tmux missing: run scripts/install-deps (Debian package tmux)")
    t = Tmux(tmp_path)
    try:
        yield t
    finally:
        t.kill()


@pytest.mark.parametrize("quit_key", ["q", "C-c"])
def test_top_live_in_a_terminal(tmux: Tmux, server: status.StatusServer, tmp_path: Path,
                                quit_key: str) -> None:
    before, after = tmp_path / "stty.before", tmp_path / "stty.after"
    top = shlex.join([*CLI, "top", "--socket", server.path, "--interval", "0.2"])
    tmux.type(f"stty -g > {before}; {top}; echo rc=$?; stty -g > {after}")
    screen = tmux.wait(lambda s: "mreaper top" in s and "last kills:" in s, "the top frame")
    lines = screen.splitlines()
    assert re.fullmatch(r"mreaper top  \d\d:\d\d:\d\d  every 0\.2 s, q quits", lines[0])
    assert lines[1].startswith("mreaper daemon 4242 at ")
    gauge = next(x for x in lines if x.startswith("machine "))
    assert re.search(r"\[#+[#.WTK]*\] MemAvailable 3\.0 GiB / 16\.0 GiB  WARN", gauge), gauge
    assert len(gauge) <= 100
    assert any("chromium" in x for x in lines)
    assert "stty -g" not in screen  # the alternate screen hides the command line
    assert tmux.flags() == ("1", "0")  # alternate screen on, cursor hidden
    modes = tmux.tty_modes().split()
    assert "-icanon" in modes and "-echo" in modes and "isig" in modes  # cbreak while running
    tmux.key(quit_key)
    screen = tmux.wait(lambda s: RC.search(s) is not None and after.exists(), "the exit status")
    assert RC.findall(screen) == ["0"], screen
    assert "stty -g" in screen  # back on the normal screen, its content intact
    assert "mreaper top" not in screen
    assert tmux.flags() == ("0", "1")  # alternate screen off, cursor shown
    tmux.wait(lambda s: after.exists() and after.read_text() != "", "stty after", 10)
    assert before.read_text() == after.read_text()  # terminal modes restored exactly
    modes = tmux.tty_modes().split()
    assert "icanon" in modes and "echo" in modes


def test_top_terminates_cleanly_on_sigterm(tmux: Tmux, server: status.StatusServer,
                                           tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    top = shlex.join([*CLI, "top", "--socket", server.path, "--interval", "0.2"])
    tmux.type(f"sh -c 'echo $$ > {pidfile}; exec {top}'; echo rc=$?")
    tmux.wait(lambda s: "mreaper top" in s, "the top frame")
    os.kill(int(pidfile.read_text()), signal.SIGTERM)
    screen = tmux.wait(lambda s: RC.search(s) is not None, "the exit status")
    assert RC.findall(screen) == ["0"], screen
    assert tmux.flags() == ("0", "1")


# --- against a real daemon ----------------------------------------------------------------


@pytest.fixture
def daemon(sockdir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`mreaper run` with its status socket in a fresh directory and levels far below
    anything this host reaches (it must never kill here)."""
    path = str(sockdir / "status.sock")
    cfg = tmp_path / "mreaper.toml"
    cfg.write_text(textwrap.dedent(f"""
        [status]
        socket = "{path}"
        [memory]
        warn = "48M"
        term = "32M"
        kill = "16M"
        [daemon]
        dry_run = true
    """))
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen([*CLI, "run", "--config", str(cfg), "--psi-warn", "off",
                             "--psi-kill", "off"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if status.query(path, timeout=2.0).get("scopes"):
                    break
            except status.StatusError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise AssertionError("the daemon did not serve its status socket (is it "
                                     "wired? daemon.py: status.serve):\n"
                                     + (tmp_path / "daemon.log").read_text())
            time.sleep(0.1)
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_status_and_top_from_a_real_daemon(daemon: tuple[subprocess.Popen[str], str]) -> None:
    proc, path = daemon
    st = status.query(path)
    assert st["pid"] == proc.pid and st["dry_run"] is True
    machine = st["scopes"][0]
    assert machine["scope"] == "machine" and machine["levels"]["kill"] == 16 * MiB
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600

    p = run_cli("status", "--socket", path)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"mreaper daemon {proc.pid} at {path} (config: ")
    assert lines[0].endswith("; dry run)")
    assert lines[1] == "machine: ok: no level held"
    assert re.search(r"warn 48\.0 MiB \(\S+ \S+ above\)  term 32\.0 MiB \(\S+ \S+ above\)  "
                     r"kill 16\.0 MiB \(\S+ \S+ above\)", p.stdout)
    assert "last kills: none" in p.stdout

    t = run_cli("top", "--once", "--socket", path, env=dict(os.environ, COLUMNS="100"))
    assert t.returncode == 0, t.stderr
    assert t.stdout.splitlines()[1].startswith(f"mreaper daemon {proc.pid} at {path}")
    assert re.search(r"^machine      \[[#.WTK]+\] MemAvailable", t.stdout, re.M)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert not os.path.exists(path)  # removed on the way out


# --- a hostile local user against the socket (issue 11, defect 8) ---------------------------

_FAKE_SERVER = textwrap.dedent("""
    # A fake mreaper daemon serving a status full of terminal escapes: run as nobody.
    import json, os, socket, sys
    path, drop = sys.argv[1], sys.argv[2] == "drop"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    os.chmod(path, 0o666)
    if drop:  # bound as root (a root-owned socket file), listening as nobody
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
    s.listen(8)
    esc = "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[31mFAKE\\r\\n\\x9b1m"
    answer = {"pid": "6666" + esc, "dry_run": False, "config": "/fake" + esc,
              "scopes": [{"scope": "machine" + esc, "severity": "kill", "reason": esc,
                          "mem_total": 1 << 30, "mem_available": 1 << 20,
                          "swap_total": 0, "swap_free": 0,
                          "levels": {"warn": 1, "term": 1, "kill": 1}}],
              "candidates": [{"pid": esc, "name": esc, "rss": 1, "oom_score": esc,
                              "score": esc, "excluded": esc, "rules": [esc]}],
              "kills": [{"pid": esc, "name": esc, "wall_time": 0, "reason": esc,
                         "mrelease": esc, "signals": [{"name": esc}]}]}
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        c.recv(4096)
        c.sendall(json.dumps(answer).encode() + b"\\n")
        c.close()
""")


@contextlib.contextmanager
def _fake_daemon(path: Path, *, drop: bool = False) -> Iterator[None]:
    """A fake daemon at `path`: run as nobody (drop=False: the socket file is nobody's),
    or bound by root and then serving as nobody (drop=True)."""
    kw: dict[str, Any] = {} if drop else {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    p = subprocess.Popen(["/usr/bin/python3", "-c", _FAKE_SERVER, str(path),
                          "drop" if drop else "keep"], stdout=subprocess.PIPE, text=True,
                         cwd="/", **kw)
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n"
        yield
    finally:
        p.kill()
        p.wait()


def _evil_tree() -> Iterator[tuple[Path, Path, Path]]:
    base = Path(tempfile.mkdtemp(prefix="mreaper-evil-", dir="/tmp"))
    base.chmod(0o755)
    evil = base / "evil"
    evil.mkdir()
    os.chown(evil, NOBODY, NOBODY)  # a directory another user owns
    link = base / "run"
    link.symlink_to(evil)           # a root-owned symlink into it
    try:
        yield base, evil, link
    finally:
        shutil.rmtree(base, ignore_errors=True)


evil_tree = pytest.fixture(_evil_tree)


def _visible(text: str) -> None:
    """Nothing in `text` a terminal would act on: no C0 control but newline, no DEL, no C1."""
    bad = [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F]
    assert not bad, f"raw control characters {bad!r} in output:\n{text!r}"


@needs_root
def test_server_refuses_a_socket_directory_another_user_controls(
        evil_tree: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    _base, evil, link = evil_tree
    fix = f"mreaper runs as root, so fix it with: chown root:root {evil} && chmod go-w {evil}"
    for directory, problem in (
            (link, f"directory {evil} is owned by uid {NOBODY}, not root"),  # via root's link
            (evil, f"owned by uid {NOBODY}, not root")):                      # directly
        with pytest.raises(OSError) as e:
            status.StatusServer(str(directory / "status.sock"), fake_status).start()
        assert e.value.strerror == f"refused: {problem}; {fix}"
        assert not (evil / "status.sock").exists()
    assert status.serve(str(link / "status.sock"), fake_status) is None
    assert f"status socket {link}/status.sock unavailable: refused" in caplog.text
    # a directory writable by others (even root's) is refused too
    open_dir = evil.parent / "open"
    open_dir.mkdir(mode=0o777)
    open_dir.chmod(0o777)
    with pytest.raises(OSError, match=r"writable by group and others \(mode 0777\)"):
        status.StatusServer(str(open_dir / "status.sock"), fake_status).start()


@needs_root
def test_status_refuses_a_fake_daemon_of_another_user(
        evil_tree: tuple[Path, Path, Path], empty_config: str) -> None:
    _base, evil, link = evil_tree
    with _fake_daemon(evil / "status.sock"):
        for sock in (link / "status.sock", evil / "status.sock"):
            p = run_cli("status", "--socket", str(sock), "--config", empty_config)
            assert p.returncode == 0, p.stderr
            _visible(p.stdout)
            first = p.stdout.splitlines()[0]
            assert first.startswith(f"refused to query {sock} (")
            assert first.endswith("): computed locally")
            assert f"uid {NOBODY}" in first
            assert "6666" not in p.stdout and "FAKE" not in p.stdout
            with pytest.raises(status.StatusError, match=f"uid {NOBODY}"):
                status.query(str(sock))


@needs_root
def test_status_refuses_a_server_that_is_not_root_by_peercred(sockdir: Path,
                                                              empty_config: str) -> None:
    """The socket file and its directory are root's, but the process serving it is not."""
    sockdir.mkdir(mode=0o755)
    sock = sockdir / "status.sock"
    with _fake_daemon(sock, drop=True):
        assert os.lstat(sock).st_uid == 0
        with pytest.raises(status.StatusError,
                           match=f"the server at {sock} runs as uid {NOBODY}, not root"):
            status.query(str(sock))
        p = run_cli("status", "--socket", str(sock), "--config", empty_config)
        _visible(p.stdout)
        assert "FAKE" not in p.stdout and "6666" not in p.stdout


def _hostile_status() -> dict[str, Any]:
    esc = "\x1b]0;pwned\x07\x1b[2J\x1b[31mX\r\nY\x9b1m\u202e\x7f"
    st = fake_status()
    st["pid"] = "4242" + esc
    st["config"] = "/etc/mreaper/mreaper.toml" + esc
    for scope in st["scopes"]:
        scope["scope"] += esc
        scope["reason"] = "warn: " + esc
        scope["cgroup"] = "/x" + esc
    st["scopes"][1]["events"] = {"oom" + esc: esc}
    st["scopes"][0]["psi"] = {"some": 1.0}
    for c in st["candidates"]:
        c["name"] += esc
        c["oom_score"] = esc
        c["score"] = esc
        c["rules"] = [esc]
    st["candidates"][1]["excluded"] = esc
    for k in st["kills"]:
        k["name"] += esc
        k["reason"] = esc
        k["mrelease"] = esc
        k["pid"] = esc
    st["kills"].append({"cgroup": esc, "members": [{"pid": esc, "mrelease": esc}],
                        "reason": esc, "wall_time": NOW})
    return st


def test_status_and_top_escape_every_field(sockdir: Path) -> None:
    with status.StatusServer(str(sockdir / "s.sock"), _hostile_status) as srv:
        p = run_cli("status", "--socket", srv.path)
        assert p.returncode == 0, p.stderr
        _visible(p.stdout)
        assert "\\x1b]0;pwned\\x07\\x1b[2J" in p.stdout  # shown, escaped
        assert p.stdout.splitlines()[0].startswith("mreaper daemon 4242\\x1b")
        t = run_cli("top", "--once", "--socket", srv.path,
                    env=dict(os.environ, COLUMNS="400", LINES="60"))
        assert t.returncode == 0, t.stderr
        _visible(t.stdout)
        assert "\\x1b[31mX\\r\\nY" in t.stdout
        j = run_cli("status", "--socket", srv.path, "--json")
        _visible(j.stdout)  # JSON escapes them itself
        assert json.loads(j.stdout)["config"] == _hostile_status()["config"]


_FLOODER = textwrap.dedent("""
    # As nobody: keep as many connections open to the status socket as the fds allow,
    # replacing each one the server closes, for sys.argv[2] seconds.
    import collections, os, socket, sys, time
    path, end = sys.argv[1], time.monotonic() + float(sys.argv[2])
    held = collections.deque()
    made = 0
    print("ready", flush=True)
    while time.monotonic() < end:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect(path)
            held.append(s)
            made += 1
        except OSError:
            s.close()
            time.sleep(0.0005)
        if len(held) > 400:
            held.popleft().close()
    print(made, flush=True)
""")


@needs_root
def test_a_flood_from_another_user_does_not_keep_root_out(sockdir: Path) -> None:
    """A loosened socket (0666 in a 0755 directory) lets any user connect.  A user who
    floods it with connections must not make root's queries fail: connections are
    bounded per peer (SO_PEERCRED) and root is answered first."""
    with status.StatusServer(str(sockdir / "s.sock"), fake_status) as srv:
        sockdir.chmod(0o755)
        os.chmod(srv.path, 0o666)
        flooders = [subprocess.Popen(["/usr/bin/python3", "-c", _FLOODER, srv.path, "20"],
                                     stdout=subprocess.PIPE, text=True, cwd="/", user=NOBODY,
                                     group=NOBODY, extra_groups=[]) for _ in range(2)]
        try:
            for f in flooders:
                assert f.stdout is not None and f.stdout.readline() == "ready\n"
            time.sleep(1.0)  # the flood is in full swing
            answered, failures = 0, []
            for _ in range(10):
                try:
                    answered += status.query(srv.path)["pid"] == 4242
                except status.StatusError as e:
                    failures.append(str(e))
                time.sleep(0.2)
            assert all(f.poll() is None for f in flooders), "the flood ended too early"
        finally:
            for f in flooders:
                f.kill()
                f.wait()
        assert (answered, failures) == (10, [])
        assert srv.refused > 0  # the flood was served its refusals, within bounds
