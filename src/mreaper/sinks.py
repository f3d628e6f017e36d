"""Sinks from the configuration: log, events file, metrics and hooks behind one Fanout.

Whatever cannot be set up (an events file we cannot open, a metrics port in use,
prometheus-client missing) is a ConfigError naming the key, so the daemon refuses to
start with an exact message instead of running without the evidence it was asked for.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mreaper.config import Config, ConfigError
from mreaper.report import Fanout, LogSink, Sink

if TYPE_CHECKING:  # imported on first use: a daemon without them never loads them
    from mreaper.hooks import Hooks

log = logging.getLogger("mreaper")


def build_sink(cfg: Config) -> tuple[Sink, Hooks | None]:
    """Fanout([LogSink, EventsSink?, MetricsSink?, Hooks?]) and the Hooks (whose
    `before_kill` goes to ReaperPool), or None when no hook is configured."""
    sinks: list[Sink] = [LogSink()]
    try:
        if cfg.events_path:
            from mreaper.events import EventsSink

            try:
                sinks.append(EventsSink(cfg.events_path))
            except OSError as e:
                raise ConfigError(cfg.origin, "events.path", cfg.events_path,
                                  f"cannot open it for appending: {e.strerror}") from None
        if cfg.metrics_listen or cfg.metrics_textfile:
            sinks.append(_metrics(cfg))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    hooks = None
    if cfg.pre_kill or cfg.post_kill:
        from mreaper.hooks import Hooks

        hooks = Hooks(cfg.pre_kill, cfg.pre_kill_timeout, cfg.post_kill)
        sinks.append(hooks)
    return Fanout(sinks), hooks


def preflight(cfg: Config) -> None:
    """What build_sink would refuse, checked without its side effects (no events file
    created, no port bound, no textfile written): today, metrics configured without
    prometheus-client.  `mreaper config` runs it, so that a configuration it calls
    valid is not refused by `run` (contrib/install.sh validates with `config`)."""
    if cfg.metrics_listen or cfg.metrics_textfile:
        from mreaper.metrics import MetricsUnavailable, require_client

        key, value = (("metrics.listen", cfg.metrics_listen) if cfg.metrics_listen
                      else ("metrics.textfile", cfg.metrics_textfile))
        try:
            require_client(cfg.metrics_listen, cfg.metrics_textfile)
        except MetricsUnavailable as e:
            raise ConfigError(cfg.origin, key, value, str(e)) from None


def _metrics(cfg: Config) -> Sink:
    from mreaper.metrics import MetricsSink, MetricsUnavailable

    key, value = (("metrics.listen", cfg.metrics_listen) if cfg.metrics_listen
                  else ("metrics.textfile", cfg.metrics_textfile))
    try:
        return MetricsSink(cfg.metrics_listen, cfg.metrics_textfile)
    except MetricsUnavailable as e:
        raise ConfigError(cfg.origin, key, value, str(e)) from None
    except (OSError, ValueError) as e:
        if cfg.metrics_listen and not getattr(e, "filename", None):
            raise ConfigError(cfg.origin, "metrics.listen", cfg.metrics_listen,
                              f"cannot listen there: {e}") from None
        raise ConfigError(cfg.origin, "metrics.textfile", cfg.metrics_textfile,
                          f"cannot write it: {e}") from None


def observe_decision(sink: Sink, seconds: float, scope: str = "machine") -> None:
    """Hand the detection-to-decision time to every sink that records it (metrics);
    a no-op when none does.  The daemon calls this where it logs "decided in"."""
    targets = sink.sinks if isinstance(sink, Fanout) else [sink]
    for target in targets:
        observe = getattr(target, "observe_decision", None)
        if observe is not None:
            try:
                observe(seconds, scope)
            except Exception as e:  # metrics must never stop a kill
                log.debug("%s.observe_decision failed: %s", type(target).__name__, e)
