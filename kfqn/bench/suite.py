"""Benchmark definitions: the suite (methods, models, batch sizes, modes) and the targets.

Both are YAML data in the repository's ``benchmarks/`` folder (``suite.yaml``, ``targets.yaml``);
``--suite`` / ``--targets`` point elsewhere. Unknown model or method names raise a
:class:`~kfqn.core.errors.ConfigError` that lists the allowed ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from kfqn.core.errors import ConfigError

#: label of the method every ratio is taken against (the ``adam`` preset, else torch.optim.Adam)
REFERENCE = "adam"
#: torch.optim.Adam's label in the suite: a second reference, reported beside the first
TORCH_REFERENCE = "adam_torch"


def benchmarks_dir() -> Path:
    """The repository's ``benchmarks/`` folder (suite and target definitions)."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


@dataclass(frozen=True)
class MethodSpec:
    """One column of the comparison: a kfqn preset (plus overrides) or a first-order baseline."""

    label: str
    preset: str | None = None
    dotlist: tuple[str, ...] = ()
    baseline: str | None = None
    force_torch: bool = False  # a baseline run with torch.optim even when a preset exists


@dataclass(frozen=True)
class ModelSpec:
    """A registered model, its input shape, classes, batch size and options."""

    key: str
    model: str
    input_shape: tuple[int, ...]
    num_classes: int | None
    batch: int
    options: dict = field(default_factory=dict, hash=False)


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} file {str(path)!r} does not exist")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {str(path)!r} must hold a mapping")
    return data


def load_suite(path: Path | None = None) -> dict:
    """The suite definitions (``benchmarks/suite.yaml`` unless ``path``), checked."""
    path = Path(path) if path else benchmarks_dir() / "suite.yaml"
    suite = _read_yaml(path, "suite")
    for key in ("methods", "models", "modes"):
        if key not in suite:
            raise ConfigError(f"suite {str(path)!r} lacks the key {key!r}")
    for mode in ("full", "quick"):
        if mode not in suite["modes"]:
            raise ConfigError(f"suite {str(path)!r} lacks modes.{mode}")
    return suite


#: record fields a target may bound
TARGET_METRICS = ("ratio_to_adam", "ratio_to_torch_adam", "state_ratio_to_adam",
                  "peak_ratio_to_adam", "host_syncs", "ops_per_layer", "ops_per_layer_max",
                  "ops_per_param_tensor")


def load_targets(path: Path | None = None) -> list[dict]:
    """The target list (``benchmarks/targets.yaml`` unless ``path``)."""
    path = Path(path) if path else benchmarks_dir() / "targets.yaml"
    targets = _read_yaml(path, "targets").get("targets", [])
    for t in targets:
        missing = {"id", "method", "model", "metric", "max"} - set(t)
        if missing:
            raise ConfigError(f"target {t.get('id', t)!r} lacks {', '.join(sorted(missing))}")
        if t["metric"] not in TARGET_METRICS:
            raise ConfigError(f"target {t['id']!r}: metric {t['metric']!r} is not one of "
                              f"{', '.join(TARGET_METRICS)}")
        bad = set(t.get("devices", [])) - {"cpu", "cuda"}
        if bad:
            raise ConfigError(f"target {t['id']!r}: devices {sorted(bad)} not allowed; "
                              "allowed: cpu, cuda")
    return targets


def _split(names: str | Sequence[str] | None) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str):
        names = names.split(",")
    return [n.strip() for n in names if n.strip()]


def resolve_methods(suite: dict, names: str | Sequence[str] | None = None,
                    registry: Any = None, mode: str = "full") -> list[MethodSpec]:
    """The suite's methods plus (unless the mode says otherwise) the other registered presets,
    filtered by ``names``.

    Adam is always included: it is the reference of every ratio. Unknown names raise a
    :class:`ConfigError` that lists the allowed ones.
    """
    from kfqn.core.registry import default_registry

    reg = registry or default_registry()
    presets = reg.names("preset")
    methods: list[MethodSpec] = []
    for m in suite["methods"]:
        if "preset" in m and m["preset"] not in presets:
            continue  # e.g. a preset another plugin has not contributed yet
        methods.append(MethodSpec(m["label"], m.get("preset"), tuple(m.get("set", ())),
                                  m.get("baseline"), m.get("impl") == "torch"))
    others = suite["modes"].get(mode, {}).get("include_other_presets",
                                              suite.get("include_other_presets", True))
    if others:
        known = {m.label for m in methods} | {m.preset for m in methods if m.preset}
        methods += [MethodSpec(p, p) for p in presets if p not in known]
    wanted = _split(names)
    if wanted is None:
        return methods
    by_label = {m.label: m for m in methods}
    unknown = [n for n in wanted if n not in by_label]
    if unknown:
        raise ConfigError(f"unknown preset/method {unknown[0]!r} for --presets; allowed: "
                          + ", ".join(by_label))
    if REFERENCE not in wanted:
        wanted = [REFERENCE, *wanted]
    return [by_label[n] for n in wanted]


def resolve_models(suite: dict, mode: str, names: str | Sequence[str] | None = None,
                   batches: dict[str, int] | None = None) -> list[ModelSpec]:
    """The models of ``mode`` (or ``names``) with the mode's and the user's batch sizes."""
    table = suite["models"]
    cfg = suite["modes"][mode]
    wanted = _split(names) or list(cfg["models"])
    unknown = [n for n in wanted if n not in table]
    if unknown:
        raise ConfigError(f"unknown model {unknown[0]!r} for --models; allowed: "
                          + ", ".join(table))
    sizes = {**cfg.get("batch", {}), **(batches or {})}
    mode_options = cfg.get("options", {})
    bad = [k for k in (batches or {}) if k not in table]
    if bad:
        raise ConfigError(f"--batch {bad[0]}=...: unknown model; allowed: {', '.join(table)}")
    out = []
    for key in wanted:
        m = table[key]
        out.append(ModelSpec(key, m["model"], tuple(m["input_shape"]), m.get("num_classes"),
                             int(sizes.get(key, m["batch"])),
                             {**m.get("options", {}), **mode_options.get(key, {})}))
    return out
