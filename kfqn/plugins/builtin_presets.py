"""Built-in presets: every YAML file in ``configs/optimizer`` (SPEC §4).

The folder is the repository's top-level ``configs/optimizer``; ``KFQN_CONFIG_DIR`` points
elsewhere (a folder holding ``optimizer/``).
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from kfqn.core.components import Preset
from kfqn.core.hookspecs import hookimpl


def config_dir() -> Path:
    """The configs folder: $KFQN_CONFIG_DIR or <repository>/configs."""
    env = os.environ.get("KFQN_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "configs"


@hookimpl
def kfqn_presets() -> list:
    folder = config_dir() / "optimizer"
    presets = []
    for path in sorted(folder.glob("*.yaml")):
        with open(path) as fh:
            head = yaml.safe_load(fh) or {}
        presets.append(Preset(path.stem, str(head.get("description", "")), path))
    return presets
