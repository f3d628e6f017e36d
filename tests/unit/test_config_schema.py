"""config_schema's table against config.py, so the reference cannot drift from the parser:
the same sections and keys (read from config.py's own "unknown key; known here: ..."
errors, not from a copy), the same defaults (read from `mreaper config`'s TOML of the
built-in defaults), and every default a value config.py accepts."""

from __future__ import annotations

import dataclasses
import tomllib
from typing import Any

import pytest

from mreaper import config
from mreaper.config_schema import KEYS, SECTIONS, keys_of

UNKNOWN = "__no_such_key__"


def known_here(data: dict[str, Any]) -> set[str]:
    """The keys config.py accepts where `data` puts an unknown one."""
    with pytest.raises(config.ConfigError) as e:
        config.apply(config.Config(), data, "test")
    prefix = "unknown key; known here: "
    assert e.value.allowed.startswith(prefix), e.value
    return set(e.value.allowed[len(prefix):].split(", "))


def probe(section: str) -> dict[str, Any]:
    bad = {UNKNOWN: 1}
    if section == "rule":
        return {"rule": [bad]}
    if section == "scope":
        return {"scope": [bad]}
    if section.startswith("scope."):
        return {"scope": [{"cgroup": "a", section.split(".", 1)[1]: bad}]}
    return {section: bad}


def value(toml_text: str) -> object:
    return tomllib.loads(f"v = {toml_text}")["v"]


def test_sections_are_exactly_those_config_accepts() -> None:
    top = {s.name for s in SECTIONS if "." not in s.name}
    assert top == known_here({UNKNOWN: {}}), HINT
    subs = {s.name for s in SECTIONS if "." in s.name}
    assert subs == {f"scope.{k.key}" for k in keys_of("scope") if k.type == "table"}


HINT = "(src/mreaper/config_schema.py describes config.py's keys: update KEYS, then `make man`)"


@pytest.mark.parametrize("section", [s.name for s in SECTIONS])
def test_keys_are_exactly_those_config_accepts(section: str) -> None:
    described = {k.key for k in keys_of(section)}
    accepted = known_here(probe(section))
    assert not accepted - described, f"[{section}] undocumented: {accepted - described} {HINT}"
    assert not described - accepted, f"[{section}] not accepted: {described - accepted} {HINT}"


def test_no_key_twice_and_every_key_documented() -> None:
    pairs = [(k.section, k.key) for k in KEYS]
    assert len(pairs) == len(set(pairs))
    for k in KEYS:
        assert k.help.strip() and k.type.strip(), k


def test_defaults_are_the_built_in_defaults() -> None:
    written = tomllib.loads(config.to_toml(config.Config()))
    for k in KEYS:
        if "scope" in k.section or k.section == "rule":
            continue
        assert k.default is not None, k
        assert value(k.default) == written[k.section][k.key], (k, HINT)


def test_scope_defaults_are_the_built_in_defaults() -> None:
    cfg = config.apply(config.Config(), {"scope": [{"cgroup": "a"}]}, "test")
    written = tomllib.loads(config.to_toml(cfg))["scope"][0]
    for k in keys_of("scope"):
        if k.key in ("name", "cgroup"):  # no default: cgroup is required, name follows it
            assert k.default is None
        elif k.type == "table":
            for sub in keys_of(f"scope.{k.key}"):
                assert sub.default is not None, sub
                assert value(sub.default) == written[k.key][sub.key], sub
        else:
            assert k.default is not None, k
            assert value(k.default) == written[k.key], k


def test_rule_defaults() -> None:
    cfg = config.apply(config.Config(), {"rule": [{"action": "avoid", "name": "x"}]}, "test")
    for k in keys_of("rule"):
        if k.key == "adjust":
            assert k.default is not None
            assert cfg.rules[0].adjust == value(k.default)
        else:  # the action is required, a matcher absent matches anything
            assert k.default is None, k


def test_each_default_is_accepted_and_changes_nothing() -> None:
    base = config.Config()
    strip = {"origin": "x"}
    for k in KEYS:
        if k.default is None or "scope" in k.section or k.section == "rule":
            continue
        cfg = config.apply(base, {k.section: {k.key: value(k.default)}}, "test")
        assert dataclasses.replace(cfg, **strip) == dataclasses.replace(base, **strip), k
    scope = {k.key: value(k.default) for k in keys_of("scope")
             if k.default is not None and k.type != "table"}
    for table in ("headroom", "psi", "events"):
        scope[table] = {k.key: value(k.default) for k in keys_of(f"scope.{table}")
                        if k.default is not None}
    alone = config.apply(base, {"scope": [{"cgroup": "a"}]}, "test")
    full = config.apply(base, {"scope": [{"cgroup": "a", **scope}]}, "test")
    assert full.scopes == alone.scopes
