"""Every test docs/guarantees.md names exists: a promise whose test was renamed or
removed is a promise nothing holds."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
DOC = TESTS.parent / "docs" / "guarantees.md"
REF = re.compile(r"`((?:unit|real|lab)/[\w/]+\.py)::(\w+)(?:\[[^\]`]*\])?`")


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_named_test_exists() -> None:
    refs = REF.findall(DOC.read_text())
    assert len(refs) > 50, "the pattern no longer finds the references"
    missing = []
    names: dict[str, set[str]] = {}
    for file, test in refs:
        path = TESTS / file
        if not path.is_file():
            missing.append(f"{file} (no such file)")
            continue
        if file not in names:
            names[file] = _test_names(path)
        if test not in names[file]:
            missing.append(f"{file}::{test}")
    assert missing == [], f"docs/guarantees.md names tests that do not exist: {missing}"
