"""Built-in presets: every YAML file shipped in the package folder ``kfqn/presets`` (docs/algorithms.md §4).

The files are package data (``importlib.resources``), so a built wheel has them and presets
resolve from any working directory. ``KFQN_CONFIG_DIR`` points elsewhere (a folder holding
``optimizer/``), e.g. to try edited copies without reinstalling.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import yaml

from kfqn.core.components import Preset
from kfqn.core.hookspecs import hookimpl


def preset_dir() -> Path:
    """The presets folder: $KFQN_CONFIG_DIR/optimizer, or the package's ``kfqn/presets``."""
    env = os.environ.get("KFQN_CONFIG_DIR")
    if env:
        return Path(env) / "optimizer"
    return Path(str(resources.files("kfqn") / "presets"))


@hookimpl
def kfqn_presets() -> list:
    presets = []
    for path in sorted(preset_dir().glob("*.yaml")):
        with open(path) as fh:
            head = yaml.safe_load(fh) or {}
        presets.append(Preset(path.stem, str(head.get("description", "")), path))
    return presets
