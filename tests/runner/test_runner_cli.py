"""The ``kfqn`` command line: exit codes, one-line errors, help, train/sweep/report/components."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest
import yaml

from kfqn import cli


def write_config(tmp_path, **extra):
    cfg = {
        "name": "clitest",
        "data": {"name": "digits", "root": str(tmp_path / "data"), "batch_size": 256},
        "model": {"name": "mlp_autoencoder", "options": {"hidden": [8], "code": 2}},
        "optimizer": {"preset": "kbfgs"},
        "budget": {"epochs": 1},
        "logging": {"root": str(tmp_path / "runs"), "progress": False},
    }
    cfg.update(extra)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv", [[], ["train"], ["sweep"], ["report"], ["components"]])
def test_help_everywhere(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv + ["--help"])
    assert e.value.code == 0
    assert "usage: kfqn" in capsys.readouterr().out


@pytest.mark.parametrize("argv,pattern", [
    (["nope"], "invalid choice: 'nope'"),
    (["train"], "the following arguments are required: config"),
    (["sweep", "x.yaml", "--workers", "two"], "invalid int value"),
])
def test_usage_errors_exit_2_in_one_line(argv, pattern, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert pattern in one_line_error(capsys)


def test_no_command(capsys):
    assert cli.main([]) == 2
    assert "a command is required" in one_line_error(capsys)


@pytest.mark.parametrize("args,pattern", [
    (["missing.yaml"], "config file missing.yaml not found"),
    (["{cfg}", "budget.epoch=3"], "unknown config key 'budget.epoch'.*Did you mean 'epochs'"),
    (["{cfg}", "lr"], "override 'lr' is not key=value"),
    (["{cfg}", "optimizer.preset=kbgfs"], "unknown optimizer preset 'kbgfs'.*Did you mean 'kbfgs'"),
    (["{cfg}", "model.name=resnet"], "model.name: unknown model 'resnet'; registered: "),
    (["{cfg}", "optimizer.lr=-1"], "lr"),
    (["{cfg}", "data.name=mnist", "data.root={tmp}"], "data set 'mnist' not found.*kfqn\\[vision\\]"),
])
def test_broken_configs_exit_2_with_one_line(tmp_path, capsys, args, pattern):
    import re

    cfg = write_config(tmp_path)
    argv = ["train"] + [a.format(cfg=cfg, tmp=tmp_path) for a in args]
    assert cli.main(argv) == 2
    err = one_line_error(capsys)
    assert err.startswith("kfqn train: error: ")
    assert re.search(pattern, err), err


def test_train_resume_overwrite_and_report(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert cli.main(["train", str(cfg), "-q"]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "clitest" / "train" / "main" / "kbfgs" / "seed0"
    assert "finished" in out and f"tensorboard --logdir {run_dir}" in out
    assert (run_dir / "config.yaml").exists()

    assert cli.main(["train", str(cfg), "-q"]) == 2  # exists
    assert "--resume" in one_line_error(capsys)
    # resume from the run directory itself with a larger budget
    assert cli.main(["train", str(run_dir), "--resume", "budget.epochs=2", "-q"]) == 0
    assert "2.00 epochs" in capsys.readouterr().out
    assert cli.main(["train", str(cfg), "--overwrite", "-q"]) == 0
    capsys.readouterr()

    assert cli.main(["report", str(run_dir), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "| main | kbfgs | 1/1 |" in out and (run_dir / "report.md").exists()
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in one_line_error(capsys)
    assert cli.main(["report", str(run_dir), "--target-loss", "low"]) == 2


def test_sweep_command_end_to_end(tmp_path, capsys):
    cfg = write_config(tmp_path, sweep={"presets": ["kbfgs", "kfbfgs_cnn", "no_such"],
                                        "seeds": [0], "skip_missing_presets": True,
                                        "fresh_process": False})
    assert cli.main(["sweep", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "note: preset 'no_such' is not registered; skipping it" in out and "2 runs" in out
    assert cli.main(["sweep", str(cfg), "-q"]) == 0
    out = capsys.readouterr().out
    sweep_dir = tmp_path / "runs" / "clitest"
    assert "| main | kbfgs | 1/1 |" in out and "| main | kfbfgs_cnn | 1/1 |" in out
    assert f"tensorboard --logdir {sweep_dir}" in out
    for f in ("sweep.json", "sweep.yaml", "report.md", "report.csv", "runs.csv"):
        assert (sweep_dir / f).exists()
    assert list((sweep_dir / "plots").glob("*.png"))
    assert cli.main(["sweep", str(cfg), "-q"]) == 2  # exists
    assert "already exists" in one_line_error(capsys)
    assert cli.main(["sweep", str(cfg), "--resume", "-q"]) == 0


def test_components_lists_the_registry(capsys):
    assert cli.main(["components"]) == 0
    out = capsys.readouterr().out
    assert "preset:" in out and "kbfgs" in out and "dataset:" in out and "curves" in out
    assert cli.main(["components", "--kind", "model", "-v"]) == 0
    out = capsys.readouterr().out
    assert "model resnet32 options:" in out and "shortcut" in out


def test_bench_subcommand_is_optional(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    cli.COMMANDS.pop("bench", None)
    monkeypatch.setitem(sys.modules, "kfqn.bench", None)  # as if the module did not exist
    cli._load_optional_commands()
    assert "bench" not in cli.COMMANDS or "unavailable" in cli.COMMANDS["bench"].help

    fake = types.ModuleType("kfqn.bench")
    fake.HELP = "micro-benchmarks"
    fake.add_arguments = lambda p: p.add_argument("--size", type=int, default=1)
    fake.run = lambda args: print(f"bench size {args.size}") or 0
    monkeypatch.setitem(sys.modules, "kfqn.bench", fake)
    cli.COMMANDS.pop("bench", None)
    assert cli.main(["bench", "--size", "3"]) == 0
    assert "bench size 3" in capsys.readouterr().out


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "kfqn.cli", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "train" in out.stdout and "sweep" in out.stdout
