"""The generated files (man pages, docs/configuration.md, the packaged default
configuration, completions) are what scripts/gen_docs.py makes from the code now: a
change to the parser or config_schema without `make man` fails here."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from mreaper import config, install_files

REPO = Path(__file__).resolve().parents[2]


def test_generated_files_are_up_to_date() -> None:
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_docs.py"), "--check"],
                       check=False, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr + p.stdout


def test_packaged_default_config_is_the_built_in_defaults_and_all_commented() -> None:
    text = install_files.data("mreaper.toml").decode()
    data = tomllib.loads(text)
    assert all(v == {} for v in data.values()), data   # section headers only: keys commented
    cfg = config.apply(config.Config(), data, "packaged")
    assert dataclasses.replace(cfg, origin="") == dataclasses.replace(config.Config(), origin="")
    # uncommented, every key is accepted and is the default; [[rule]] and [[scope]] are
    # examples (one each)
    whole = tomllib.loads(re.sub(r"(?m)^#(?=\S)", "", text))
    cfg = config.apply(config.Config(), whole, "uncommented")
    assert len(cfg.rules) == 1 and len(cfg.scopes) == 1
    assert (dataclasses.replace(cfg, origin="", rules=(), scopes=())
            == dataclasses.replace(config.Config(), origin=""))


def test_packaged_unit_is_the_contrib_unit() -> None:
    for name in ("mreaper.service", "mreaper.slice"):
        assert install_files.data(name) == (REPO / "contrib" / "systemd" / name).read_bytes()
