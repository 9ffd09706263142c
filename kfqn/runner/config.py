"""Experiment configs: schema, defaults, dotlist overrides, task/preset composition, validation.

An experiment config is a YAML file (OmegaConf, so ``${...}`` interpolation works) with the
sections of :data:`SCHEMA`. One *run* is composed from it in this order, later entries winning:

1. the defaults of :data:`SCHEMA`, then the file;
2. ``tasks[<task>]`` (a fragment merged over the whole config) when a task is selected;
3. ``optimizer.preset`` set to the preset of the run, then ``presets[<preset>]`` (per-preset
   optimizer settings such as ``lr``) merged into ``optimizer``;
4. one point of ``sweep.grid`` (sweeps only);
5. the command-line overrides (``key=value``), which therefore always win.

When a fragment or override changes ``data.name`` or ``model.name``, that section's
``options`` start empty (they belong to the old component). The composed config is resolved
(interpolations evaluated), checked against the schema and saved with the run.
"""
from __future__ import annotations

import copy
import hashlib
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kfqn.core.components import Option
from kfqn.core.config import FREE  # free-form mapping, validated by its owner (component, optimizer)
from kfqn.core.errors import ConfigError
from kfqn.core.registry import close_matches

_num = (int, float)
#: seeds go to torch, NumPy and Python alike; NumPy takes 32 bits
MAX_SEED = 2**32 - 1


class PerTaskOption(Option):
    """An option that takes one value, or a mapping task -> value (``report.target_loss``)."""

    per_task = True

    def validate(self, key: str, value: Any) -> Any:
        if isinstance(value, (DictConfig, Mapping)):
            return {str(k): Option.validate(self, f"{key}.{k}", v) for k, v in value.items()}
        return Option.validate(self, key, value)


SCHEMA: dict[str, Any] = {
    "name": Option("experiment", "experiment name: runs go under <logging.root>/<name>", str),
    "seed": Option(0, "seed of initialisation, data order and augmentation", int, low=0,
                   high=MAX_SEED),
    "device": Option("cpu", "where to train", choices=("cpu", "cuda", "auto")),
    "threads": Option(None, "torch intra-op threads (null: torch's default)", int, low=1,
                      nullable=True),
    "deterministic": Option(False, "torch.use_deterministic_algorithms(True)", bool),
    "task": Option(None, "entry of `tasks` merged into this run", str, nullable=True),
    "plugins": Option([], "modules to import and register first (their data sets, models, "
                      "optimizer components, presets), e.g. ['my_lab.datasets']", list),
    "tasks": FREE,
    "presets": FREE,
    "optimizer": FREE,
    "data": {
        "name": Option(None, "registered data set (kfqn components)", str, nullable=True),
        "root": Option("${oc.env:KFQN_DATA,'~/.cache/kfqn'}", "where data sets live", str),
        "seed": Option(0, "seed of generated data and of splits (not the run seed)", int, low=0,
                       high=MAX_SEED),
        "options": FREE,
        "batch_size": Option(128, "training minibatch size", int, low=1),
        "eval_batch_size": Option(1000, "batch size of evaluation passes", int, low=1),
        "drop_last": Option(True, "drop the last incomplete training batch of each epoch", bool),
        "augment": Option(None, "null: the data set's default; true/false; 'crop_flip'",
                          (bool, str), nullable=True),
        "download": Option(False, "download a missing data set (needs torchvision)", bool),
    },
    "model": {
        "name": Option(None, "registered model (kfqn components)", str, nullable=True),
        "options": FREE,
    },
    "schedule": {
        "name": Option(None, "a class of torch.optim.lr_scheduler (StepLR, CosineAnnealingLR, "
                       "...) or null for a constant learning rate", str, nullable=True),
        "options": FREE,
        "interval": Option("epoch", "call scheduler.step() every epoch or every step",
                           choices=("epoch", "step")),
    },
    "budget": {
        "epochs": Option(None, "stop after this many epochs (fractions allowed)", _num,
                         low=0, open_low=True, nullable=True),
        "seconds": Option(None, "stop after this much wall-clock training time", _num,
                          low=0, open_low=True, nullable=True),
        "cpu_seconds": Option(None, "stop after this much process CPU time in training "
                              "(time.process_time; the papers' budget)", _num,
                              low=0, open_low=True, nullable=True),
        "steps": Option(None, "stop after this many optimizer steps", int, low=1, nullable=True),
    },
    "eval": {
        "every_epochs": Option(1, "evaluate every this many epochs (and at the end)", int, low=1),
        "at_start": Option(True, "evaluate once before training (curves start at epoch 0)",
                           bool),
        "train_loss": Option(True, "evaluate the loss on the whole training set", bool),
        "max_train_samples": Option(None, "evaluate the training loss on at most this many "
                                    "samples (null: all)", int, low=1, nullable=True),
        "weight_decay": Option(None, "tau of the reported L2 term (tau/2)||theta||^2; null: each "
                               "param group's weight_decay", _num, low=0, nullable=True),
    },
    "logging": {
        "root": Option("runs", "root directory of all runs", str),
        "run_dir": Option(None, "this run's directory (null: <root>/<name>/<task>/<method>/"
                          "seed<seed>)", str, nullable=True),
        "every_steps": Option(10, "log training scalars every this many steps", int, low=1),
        "stats_every_steps": Option(50, "log optimizer stats() every this many steps", int, low=1),
        "tensorboard": Option(True, "write TensorBoard event files", bool),
        "progress": Option(True, "show a tqdm progress bar", bool),
        "checkpoint_every_epochs": Option(1, "checkpoint every this many epochs (0: only at the "
                                          "end or on interruption)", int, low=0),
        "checkpoint_every_seconds": Option(300.0, "also checkpoint after this much wall time "
                                           "(0: never)", _num, low=0),
    },
    "report": {
        "target_loss": PerTaskOption(
            "auto", "training loss for the time-to-target column: a number, 'auto' (worst "
            "final loss among methods) or null; or a mapping task -> one of those, e.g. "
            "{curves: 150, digits: 0.05}", (float, int, str), nullable=True),
        "time": Option("cpu", "clock of the loss-vs-time plots", choices=("cpu", "wall")),
    },
    "sweep": {
        "presets": Option(None, "presets to run (null: optimizer.preset only)", list,
                          nullable=True),
        "seeds": Option([0], "run seeds", list),
        "tasks": Option(None, "entries of `tasks` to run (null: all, or none if no tasks)", list,
                        nullable=True),
        "grid": FREE,
        "workers": Option(1, "runs in parallel (worker processes)", int, low=1),
        "fresh_process": Option(True, "run every run in a new process (each run's own peak "
                                "memory; Ctrl-C checkpoints every running run; costs a few "
                                "seconds of start-up per run)", bool),
        "skip_missing_presets": Option(False, "skip (with a note) presets that are not "
                                       "registered instead of failing (a name close to a "
                                       "registered one is always an error)", bool),
    },
}

#: sections whose change on resume does not alter the experiment itself
RESUMABLE_SECTIONS = ("budget", "logging", "eval", "report", "sweep", "threads", "device")

_KEY_RE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*$")


def defaults() -> dict[str, Any]:
    """The default config as a plain dict."""

    def walk(node: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in node.items():
            if isinstance(v, Option):
                out[k] = v.default
            elif v == FREE:
                out[k] = {}
            else:
                out[k] = walk(v)
        return out

    return walk(SCHEMA)


# -- loading and overrides ---------------------------------------------------------------------
def experiment_names() -> list[str]:
    """Names of the experiment configs shipped in the package (``kfqn sweep quickstart``)."""
    root = resources.files("kfqn.runner.experiments")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def find_config(ref: str | Path) -> Path:
    """The config file for ``ref``: a path to a YAML file, or the name of a shipped experiment
    config (``quickstart``, ``p2_autoencoders``, ``p1_cifar``; package data, so any working
    directory works)."""
    p = Path(ref)
    if p.is_file():
        return p
    name = str(ref)[:-5] if str(ref).endswith(".yaml") else str(ref)
    if name in experiment_names() and "/" not in name:
        res = resources.files("kfqn.runner.experiments") / f"{name}.yaml"
        return Path(str(res))
    names = experiment_names()
    if p.is_dir():
        raise ConfigError(f"{ref} is a directory without config.yaml or sweep.yaml; give a "
                          f"config file, a run or sweep directory, or a shipped config name "
                          f"({', '.join(names)})")
    raise ConfigError(f"config file {ref} not found: give a path to a YAML file or the name of a "
                      f"shipped config ({', '.join(names)})." + close_matches(name, names))


def load_file(path: str | Path) -> DictConfig:
    """The YAML file at ``path`` as a DictConfig (unresolved)."""
    try:
        cfg = OmegaConf.load(str(path))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except Exception as exc:  # yaml.YAMLError, OmegaConf errors: report them in one line
        raise ConfigError(f"{path}: cannot parse: {_one_line(exc)}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: an experiment config must be a mapping at the top level")
    return cfg


def parse_overrides(items: Iterable[str]) -> list[tuple[str, Any]]:
    """``["a.b=1", ...]`` as ``[("a.b", 1), ...]`` with values parsed as OmegaConf/YAML does."""
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not _KEY_RE.match(key):
            raise ConfigError(f"override {item!r} is not key=value (e.g. optimizer.lr=0.1 or "
                              "budget.epochs=5)")
        try:
            parsed = OmegaConf.from_dotlist([f"v={raw}"])
            value = OmegaConf.to_container(parsed, resolve=False)["v"]
        except OmegaConfBaseException as exc:
            raise ConfigError(
                f"override {item!r}: cannot parse the value: {_one_line(exc)}") from None
        out.append((key, value))
    return out


def _set(cfg: DictConfig, key: str, value: Any) -> None:
    """Set dotted ``key`` to ``value``, resetting a section's options when its name changes."""
    section, _, leaf = key.rpartition(".")
    if leaf == "name" and section in ("data", "model"):
        old = OmegaConf.select(cfg, key, default=None)
        if old is not None and old != value:
            OmegaConf.update(cfg, f"{section}.options", {}, merge=False)
    try:
        OmegaConf.update(cfg, key, value, merge=False)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot set {key}: {_one_line(exc)}") from None


def apply_overrides(cfg: DictConfig, overrides: Sequence[tuple[str, Any]]) -> DictConfig:
    """``cfg`` with the parsed overrides applied in order (``*.name`` first, see :func:`_set`)."""
    ordered = sorted(overrides, key=lambda kv: 0 if kv[0].endswith(".name") else 1)
    for key, value in ordered:
        _set(cfg, key, value)
    return cfg


def merge_fragment(cfg: DictConfig, fragment: Any, where: str) -> DictConfig:
    """``cfg`` with ``fragment`` (a mapping) merged over it; component renames reset options."""
    if fragment is None:
        return cfg
    if not isinstance(fragment, (DictConfig, Mapping)):
        raise ConfigError(f"{where} must be a mapping of config keys, got {fragment!r}")
    frag = OmegaConf.create(fragment) if not isinstance(fragment, DictConfig) else fragment
    for section in ("data", "model"):
        new = OmegaConf.select(frag, f"{section}.name", default=None)
        if new is not None and new != OmegaConf.select(cfg, f"{section}.name", default=None):
            OmegaConf.update(cfg, f"{section}.options", {}, merge=False)
    try:
        return OmegaConf.merge(cfg, frag)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{where}: cannot merge: {_one_line(exc)}") from None


# -- composition -------------------------------------------------------------------------------
def base_config(path_or_cfg: str | Path | DictConfig | Mapping,
                overrides: Sequence[tuple[str, Any]] = ()) -> DictConfig:
    """Defaults + the file (or mapping) + overrides; not yet composed into a run."""
    if isinstance(path_or_cfg, (str, Path)):
        user = load_file(path_or_cfg)
    else:
        user = OmegaConf.create(path_or_cfg)
    cfg = merge_fragment(OmegaConf.create(defaults()), user, "config")
    return apply_overrides(cfg, overrides)


def compose_run(base: DictConfig, overrides: Sequence[tuple[str, Any]] = (), *,
                task: Optional[str] = None, preset: Optional[str] = None,
                seed: Optional[int] = None,
                grid_point: Sequence[tuple[str, Any]] = ()) -> DictConfig:
    """The resolved, validated config of one run (see the module docstring for the order)."""
    cfg = copy.deepcopy(base)
    explicit = task is not None
    task = task if explicit else cfg.get("task")
    tasks = cfg.get("tasks") or {}
    # a saved run config has its task merged in already and no `tasks`: the name is a label
    if task is not None and (tasks or explicit):
        if task not in tasks:
            names = ", ".join(tasks) or "(none defined)"
            raise ConfigError(f"task {task!r} is not in tasks; tasks: {names}."
                              + close_matches(task, tasks))
        cfg = merge_fragment(cfg, tasks[task], f"tasks.{task}")
        cfg.task = task
    if preset is not None:
        OmegaConf.update(cfg, "optimizer.preset", preset, merge=False)
    preset = OmegaConf.select(cfg, "optimizer.preset", default=None)
    per_preset = (cfg.get("presets") or {}).get(preset) if preset else None
    if per_preset is not None:
        if not isinstance(per_preset, (DictConfig, Mapping)):
            raise ConfigError(f"presets.{preset} must be a mapping of optimizer keys "
                              f"(e.g. {{lr: 0.1}}), got {per_preset!r}")
        cfg.optimizer = OmegaConf.merge(cfg.optimizer, per_preset)
    apply_overrides(cfg, grid_point)
    apply_overrides(cfg, overrides)
    if seed is not None:
        cfg.seed = seed
    for key in ("tasks", "presets", "sweep"):
        cfg.pop(key, None)
    return validate(resolve(cfg))


def resolve(cfg: DictConfig) -> DictConfig:
    """``cfg`` with every interpolation evaluated (a clear error naming the key otherwise)."""
    try:
        return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(f"cannot resolve {key or 'an interpolation'}: {_one_line(exc)}") from None


def validate(cfg: DictConfig, schema: Mapping[str, Any] = SCHEMA, prefix: str = "") -> DictConfig:
    """Check every key of ``cfg`` against ``schema`` with the library's validator
    (:func:`kfqn.core.config.validate_section`); raises :class:`ConfigError`."""
    from kfqn.core.config import validate_section

    def unknown(where: str, key: str, schema: Mapping[str, Any], label: str) -> str:
        place = f"of {where}" if where else "at the top level"
        full = f"{where}.{key}" if where else key
        return (f"unknown config key {full!r}; known keys {place}: {', '.join(schema)}."
                + close_matches(key, schema))
    checked = validate_section(to_dict(cfg), schema, prefix.rstrip("."), None,
                               unknown=unknown, fill=False)
    for key, value in checked.items():
        cfg[key] = value
    if not prefix:
        _check_run(cfg)
    return cfg


def _check_run(cfg: DictConfig) -> None:
    b = cfg.budget
    if all(b[k] is None for k in ("epochs", "seconds", "cpu_seconds", "steps")):
        raise ConfigError("the run has no budget: set at least one of budget.epochs, "
                          "budget.seconds, budget.cpu_seconds, budget.steps")
    if not OmegaConf.select(cfg, "optimizer.preset", default=None):
        raise ConfigError("optimizer.preset is not set; name a preset (kfqn components lists "
                          "them), e.g. optimizer.preset=kbfgs")
    check_name(cfg.name)
    t = cfg.report.target_loss
    for key, v in (t.items() if isinstance(t, Mapping) else [("", t)]):
        if isinstance(v, str) and v != "auto":
            raise ConfigError(f"report.target_loss{'.' + key if key else ''} = {v!r}: give a "
                              "number, 'auto' or null (or a mapping task -> one of those)")


_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._=+,-]*$")


def check_name(name: Any) -> str:
    """``name`` if it is one safe path component (runs stay inside logging.root)."""
    text = str(name)
    if not _NAME_RE.match(text) or ".." in text:
        raise ConfigError(f"name = {text!r} must be one directory name (letters, digits and "
                          "._=+,- ; no '/' or '..') so that runs stay inside logging.root; "
                          "use logging.root=DIR to put runs elsewhere")
    return text


#: overrides that do not change what a run computes: not part of derived directory names
_LABEL_EXCLUDED = ("name", "task", "seed", "optimizer.preset", "logging", "eval", "report",
                   "threads", "device", "budget", "sweep.workers", "sweep.fresh_process",
                   "sweep.skip_missing_presets")


def _label_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(_label_value(x) for x in v)
    if isinstance(v, Mapping):
        return ",".join(f"{k}:{_label_value(x)}" for k, x in v.items())
    return str(v)


def override_label(overrides: Sequence[tuple[str, Any]], max_len: int = 60,
                   exclude: Sequence[str] = ()) -> str:
    """A directory-name suffix for the overrides that change the experiment.

    ``[("optimizer.lr", 0.1), ("budget.epochs", 3)]`` -> ``"lr=0.1"``: the last component of
    each key (the full key where two would collide) and its value, joined by ``-``. Budget,
    logging, eval, report, device, threads, seed, task and preset overrides are left out (seed,
    task and preset are in the run path already; the rest may change on resume), and the keys
    under ``exclude`` (``kfqn train`` ignores ``sweep``). Long labels end in a short hash.
    Empty when no override counts.
    """
    excluded = (*_LABEL_EXCLUDED, *exclude)
    keep = [(k, v) for k, v in overrides
            if not any(k == e or k.startswith(e + ".") for e in excluded)]
    if not keep:
        return ""
    last = [k.rsplit(".", 1)[-1] for k, _ in keep]
    parts = [f"{k if last.count(s) > 1 else s}={_label_value(v)}"
             for (k, v), s in zip(keep, last)]
    label = re.sub(r"[^A-Za-z0-9._=+,-]+", "_", "-".join(parts)).strip("_")
    if len(label) > max_len:
        digest = hashlib.sha1(repr(keep).encode()).hexdigest()[:8]
        label = f"{label[:max_len - 9].rstrip('-_,')}-{digest}"
    return label


def config_diff(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain nested mappings."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """A resolved plain-dict copy of ``cfg``."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def save(cfg: DictConfig, path: str | Path) -> Path:
    """Write the resolved ``cfg`` as YAML to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(to_dict(cfg)), str(path))
    return path


def _one_line(exc: BaseException) -> str:
    """The first line of an exception message (OmegaConf adds multi-line context)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
