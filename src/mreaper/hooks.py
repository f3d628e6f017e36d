"""Hooks: run a configured command before a kill (bounded, blocking) and after it (async).

Commands are argv lists executed without a shell; what is known about the victim is
passed only in MREAPER_* environment variables, never on the command line, so a
process named `$(rm -rf /)` is just a string.  The environment is built from scratch
(PATH plus the documented variables; nothing of the daemon's own is inherited).
See docs/hooks.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mreaper import kube
from mreaper.linux import trust
from mreaper.reap import KillReport, Victim
from mreaper.report import Episode, Sample

log = logging.getLogger("mreaper")

HOOK_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
MAX_POST = 4                # post-kill hooks running at once; more are dropped
POST_KILL_TIMEOUT = 60.0    # a post-kill hook's process group is killed after this long
PRE_KILL = "pre_kill"
POST_KILL = "post_kill"

# Every variable a hook can see, and nothing else (docs/hooks.md).
COMMON_VARS = ("PATH", "MREAPER_EVENT", "MREAPER_PID", "MREAPER_NAME", "MREAPER_UID",
               "MREAPER_CGROUP", "MREAPER_CMDLINE", "MREAPER_RSS", "MREAPER_REASON",
               "MREAPER_SCOPE", "MREAPER_POD_UID", "MREAPER_QOS", "MREAPER_CONTAINER_ID")
POST_VARS = ("MREAPER_FREED", "MREAPER_OUTCOME", "MREAPER_KILL_TO_FREE_MS")


@dataclass(frozen=True, slots=True)
class HookRun:
    """What one hook run did."""

    event: str                 # "pre_kill" | "post_kill"
    pid: int | None            # the hook's PID (= its process group), None if not started
    returncode: int | None     # negative: killed by that signal
    timed_out: bool            # its process group was killed at the timeout
    duration_s: float
    error: str = ""            # why it could not be started


def _clean(value: str) -> str:
    """An environment value: no NUL (execve cannot carry one), always encodable."""
    value = value.replace("\0", "")
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def hook_env(event: str, *, pid: int, name: str, uid: int, cgroup: str,
             cmdline: Sequence[str], rss: int, reason: str, scope: str,
             extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The complete environment of a hook: PATH and the MREAPER_* variables, verbatim
    (NUL stripped), nothing inherited from the daemon."""
    env = {
        "PATH": HOOK_PATH,
        "MREAPER_EVENT": event,
        "MREAPER_PID": str(pid),
        "MREAPER_NAME": name,
        "MREAPER_UID": str(uid),
        "MREAPER_CGROUP": cgroup,
        "MREAPER_CMDLINE": " ".join(cmdline),
        "MREAPER_RSS": str(rss),
        "MREAPER_REASON": reason,
        "MREAPER_SCOPE": scope,
        # the victim's pod, from the same cgroup path; all "" outside pods
        **{f"MREAPER_{k.upper()}": v for k, v in _pod_vars(cgroup).items()},
        **(extra or {}),
    }
    return {k: _clean(v) for k, v in env.items()}


def _pod_vars(cgroup: str) -> dict[str, str]:
    pod = kube.pod_of(cgroup)
    return pod.to_dict() if pod is not None else {"pod_uid": "", "qos": "",
                                                   "container_id": ""}


_SCOPED_REASON = re.compile(r"^(.+?) (?:warn|term|kill): ")


def scope_of(reason: str, default: str = "machine") -> str:
    """The scope a kill reason names: the daemon writes "<scope> kill: ..." for a cgroup
    scope and "kill: ..." for the machine."""
    m = _SCOPED_REASON.match(reason)
    return m.group(1) if m else default


def victim_env(victim: Victim, reason: str, scope: str) -> dict[str, str]:
    """The pre-kill environment, from a pinned victim."""
    return hook_env(PRE_KILL, pid=victim.pid, name=victim.name, uid=victim.uid,
                    cgroup=victim.cgroups.unified, cmdline=victim.cmdline,
                    rss=victim.holdings.vm_rss, reason=reason, scope=scope)


def report_env(report: KillReport, scope: str) -> dict[str, str]:
    """The post-kill environment, from a kill report ("" for what was not measured)."""
    ktf = report.kill_to_free_s
    return hook_env(POST_KILL, pid=report.pid, name=report.name, uid=report.uid,
                    cgroup=report.cgroup, cmdline=report.cmdline,
                    rss=report.holdings.vm_rss, reason=report.reason, scope=scope,
                    extra={"MREAPER_FREED": "" if report.freed_bytes is None
                           else str(report.freed_bytes),
                           "MREAPER_OUTCOME": report.mrelease.value,
                           "MREAPER_KILL_TO_FREE_MS": "" if ktf is None else f"{ktf * 1000:.1f}"})


def _output_fd() -> int:
    """Hook output goes to our stderr (the journal), never to stdout (events may be there)."""
    try:
        os.fstat(2)
    except OSError:
        return subprocess.DEVNULL
    return 2


def _refusal(path: str) -> str:
    """Why the hook at `path` must not run now, or "".  The configuration checked it at
    load, but a file that was safe then may not be now (a directory on its path made
    writable, the hook replaced through it): so its whole path, and its #!
    interpreter's, is walked again immediately before each run.  Once every component
    is root's, nobody else can change what the path resolves to before the exec that
    follows (docs/hooks.md)."""
    try:
        trust.check_executable(path, enforce=os.geteuid() == 0)
    except trust.Untrusted as e:
        return e.reason(path)
    except OSError as e:
        return e.strerror or str(e)
    return ""


def run_hook(event: str, argv: Sequence[str], env: Mapping[str, str],
             timeout: float) -> HookRun:
    """Run `argv` in a new session with exactly `env`; after `timeout` seconds SIGKILL
    its whole process group.  Refused (logged, not run) when its path is no longer
    root's.  Never raises for the hook's own failures."""
    start = time.monotonic()
    refusal = _refusal(argv[0]) if argv else "an empty command"
    if refusal:
        log.error("%s hook %s not run: %s", event, argv[0] if argv else "[]", refusal)
        return HookRun(event, None, None, False, time.monotonic() - start, refusal)
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=_output_fd(),
                                stderr=_output_fd(), close_fds=True, env=dict(env), cwd="/",
                                start_new_session=True)
    except (OSError, ValueError) as e:
        log.error("%s hook %s could not be started: %s", event, argv[0], e)
        return HookRun(event, None, None, False, time.monotonic() - start, str(e))
    timed_out = False
    try:
        rc = proc.wait(timeout=max(timeout, 0.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        # The leader is not reaped yet, so its PID (= the group ID) cannot be reused.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    run = HookRun(event, proc.pid, rc, timed_out, time.monotonic() - start)
    if timed_out:
        log.warning("%s hook %s (pid %d) still running after %g s: its process group was "
                    "killed", event, argv[0], proc.pid, timeout)
    elif rc != 0:
        log.warning("%s hook %s (pid %d) exited with %s after %.0f ms", event, argv[0],
                    proc.pid, f"signal {-rc}" if rc < 0 else f"status {rc}",
                    run.duration_s * 1000)
    else:
        log.debug("%s hook %s (pid %d) done in %.0f ms", event, argv[0], proc.pid,
                  run.duration_s * 1000)
    return run


class Hooks:
    """The pre-kill step (`before_kill`, for ReaperPool) and a Sink running the post-kill
    hook after each kill report without blocking the caller."""

    def __init__(self, pre_kill: tuple[str, ...] = (), pre_kill_timeout: float = 2.0,
                 post_kill: tuple[str, ...] = (), *, scope: str = "machine",
                 max_post: int = MAX_POST, post_kill_timeout: float = POST_KILL_TIMEOUT) -> None:
        if pre_kill_timeout < 0 or post_kill_timeout < 0:
            raise ValueError("hook timeouts must not be negative")
        if max_post < 1:
            raise ValueError(f"max_post {max_post!r}: must be at least 1")
        self.pre_kill = tuple(pre_kill)
        self.pre_kill_timeout = pre_kill_timeout
        self.post_kill = tuple(post_kill)
        self.post_kill_timeout = post_kill_timeout
        self.scope = scope
        self.max_post = max_post
        self.last_pre: HookRun | None = None
        self.last_post: HookRun | None = None
        self.dropped = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._running = 0
        self._closed = False

    # -- pre-kill: in the reaper thread, after the victim is pinned, before any signal
    def before_kill(self, victim: Victim, reason: str) -> None:
        """Run the pre-kill hook and wait for it, at most pre_kill_timeout seconds.
        MREAPER_SCOPE comes from the reason's scope prefix (ReaperPool passes no scope)."""
        if not self.pre_kill:
            return
        env = victim_env(victim, reason, scope_of(reason, self.scope))
        self.last_pre = run_hook(PRE_KILL, self.pre_kill, env, self.pre_kill_timeout)

    # -- post-kill: the Sink protocol
    def kill(self, report: KillReport, scope: str) -> None:
        """Start the post-kill hook in a thread and return at once; drop it (with a log
        line) when max_post hooks are still running."""
        if not self.post_kill:
            return
        with self._lock:
            if self._closed:
                return
            if self._running >= self.max_post:
                self.dropped += 1
                log.warning("post-kill hook for %d %r dropped: %d hooks still running",
                            report.pid, report.name, self._running)
                return
            self._running += 1
        env = report_env(report, scope)
        try:
            threading.Thread(target=self._post, args=(env,), name="mreaper-post-kill",
                             daemon=True).start()
        except BaseException:
            self._done()
            raise

    def _post(self, env: dict[str, str]) -> None:
        try:
            self.last_post = run_hook(POST_KILL, self.post_kill, env, self.post_kill_timeout)
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._running -= 1
            self._idle.notify_all()

    @property
    def running(self) -> int:
        """Post-kill hooks running now."""
        return self._running

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no post-kill hook runs; False if some still do after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def episode(self, event: Episode) -> None:
        pass

    wants_samples = False  # hooks run on kills only

    def sample(self, sample: Sample) -> None:
        pass

    def close(self) -> None:
        """No new post-kill hooks; give the running ones a moment (they run in their own
        sessions and finish on their own, bounded by post_kill_timeout)."""
        with self._lock:
            self._closed = True
        if not self.wait_idle(2.0):
            log.info("%d post-kill hooks still running at shutdown", self._running)
