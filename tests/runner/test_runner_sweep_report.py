"""Sweeps (expansion, failures and divergence, parallel workers) and reports."""
from __future__ import annotations

import json

import pytest

from kfqn.core.errors import ConfigError
from kfqn.runner import config as C
from kfqn.runner.logs import read_csv
from kfqn.runner.report import write_report
from kfqn.runner.sweep import expand, method_label, run_sweep


def sweep_base(tmp_path, sweep, **extra):
    cfg = {
        "name": "sw",
        "data": {"name": "digits", "root": str(tmp_path / "data"), "batch_size": 256},
        "model": {"name": "mlp_autoencoder", "options": {"hidden": [8], "code": 2}},
        "optimizer": {"preset": "kbfgs"},
        "budget": {"epochs": 1},
        "logging": {"root": str(tmp_path / "runs"), "progress": False},
        "sweep": sweep,
    }
    cfg.update(extra)
    return C.base_config(cfg)


def test_expand_grid_tasks_presets_seeds(tmp_path):
    base = sweep_base(
        tmp_path,
        {"presets": ["kbfgs", "kbfgs_l", "not_a_preset"], "seeds": [0, 1],
         "skip_missing_presets": True,
         "grid": {"optimizer.lr": [0.1, 0.2]}},
        tasks={"a": {"budget": {"epochs": 2}}, "b": {}},
        presets={"kbfgs_l": {"damping": 1.0}},
    )
    notes = []
    specs = expand(base, [], tmp_path / "runs" / "sw", note=notes.append)
    assert len(specs) == 2 * 2 * 2 * 2
    assert notes == [notes[0]] and "'not_a_preset' is not registered; skipping" in notes[0]
    s = specs[0]
    assert (s.task, s.preset, s.seed, s.method) == ("a", "kbfgs", 0, "kbfgs[lr=0.1]")
    assert s.run_dir.endswith("sw/a/kbfgs-lr=0.1/seed0")
    assert s.config["budget"]["epochs"] == 2 and s.config["optimizer"]["lr"] == 0.1
    l_spec = next(x for x in specs if x.preset == "kbfgs_l")
    assert l_spec.config["optimizer"]["damping"] == 1.0
    assert len({x.run_dir for x in specs}) == len(specs)


@pytest.mark.parametrize("skip", [False, True])
def test_a_misspelt_preset_is_an_error_before_anything_runs(tmp_path, skip):
    # a close match is a typo, never skipped, even with skip_missing_presets
    base = sweep_base(tmp_path, {"presets": ["kbfgs", "kbgfs"], "skip_missing_presets": skip})
    with pytest.raises(ConfigError, match="'kbgfs' is not registered.*Did you mean 'kbfgs'"):
        expand(base, [], tmp_path / "sw")
    assert not (tmp_path / "sw").exists()


def test_unregistered_preset_is_an_error_by_default(tmp_path):
    base = sweep_base(tmp_path, {"presets": ["kbfgs", "not_a_preset"]})
    with pytest.raises(ConfigError, match="'not_a_preset' is not registered"):
        expand(base, [], tmp_path / "sw")


def test_method_label():
    assert method_label("adam", []) == "adam"
    assert method_label("kbfgs", [("optimizer.lr", 0.1), ("a.damping", 1)]) == \
        "kbfgs[lr=0.1,damping=1]"
    assert method_label("x", [("a.lr", 1), ("b.lr", 2)]) == "x[a.lr=1,b.lr=2]"


def test_sweep_goes_on_after_divergence_and_failure(tmp_path, sgd):
    # sgd adapter: lr 1e12 diverges; a bad model option fails at build time
    base = sweep_base(tmp_path, {"presets": ["kbfgs", "kbfgs_l", "kfbfgs_cnn"], "seeds": [0]},
                      presets={"kbfgs_l": {"lr": 1e12}})
    sweep_dir = tmp_path / "runs" / "sw"
    specs = expand(base, [], sweep_dir)
    specs[2].config["model"]["options"]["hidden"] = ["x"]  # breaks only the last run
    lines = []
    records = run_sweep(specs, sweep_dir, quiet=True, echo=lines.append)
    assert [r["status"] for r in records] == ["finished", "diverged", "failed"]
    assert "hidden" in records[2]["message"]
    assert any("diverged" in line for line in lines)
    index = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["status"] for r in index["runs"]] == ["finished", "diverged", "failed"]

    # resuming skips what ended and retries what failed
    specs[2].config["model"]["options"]["hidden"] = [8]
    again = run_sweep(specs, sweep_dir, resume=True, quiet=True, echo=lines.append)
    assert [r["status"] for r in again] == ["finished", "diverged", "finished"]
    assert again[0]["message"] == "already done (resume)"

    report = write_report(sweep_dir)
    rows = read_csv(sweep_dir / "report.csv")
    assert [r["method"] for r in rows] == ["kbfgs", "kbfgs_l", "kfbfgs_cnn"]
    assert rows[1]["diverged"] == "1" and rows[1]["finished"] == "0"
    assert "1 div." in report.markdown


def test_parallel_sweep_with_worker_processes(tmp_path):
    base = sweep_base(tmp_path, {"presets": ["kbfgs"], "seeds": [0, 1], "workers": 2},
                      threads=1)
    sweep_dir = tmp_path / "runs" / "sw"
    specs = expand(base, [], sweep_dir)
    records = run_sweep(specs, sweep_dir, workers=2, fresh_process=True, quiet=True,
                        echo=lambda s: None)
    assert sorted(r["status"] for r in records) == ["finished"] * 2
    for k in (0, 1):
        run = sweep_dir / "main" / "kbfgs" / f"seed{k}"
        assert (run / "checkpoint.pt").exists()
        s = json.loads((run / "status.json").read_text())
        assert s["peak_memory_mb"] >= s["memory_start_mb"] > 0


def _fake_run(root, task, method, seed, curve, status="finished", task_type="reconstruction"):
    """A run directory as the trainer writes it, with a given (epoch, cpu, loss) curve."""
    from kfqn.runner.logs import EPOCH_COLUMNS, CsvLog
    from kfqn.runner.rundir import run_path, write_status

    d = run_path(root, task, method, seed)
    log = CsvLog(d / "epochs.csv", EPOCH_COLUMNS)
    for i, (epoch, cpu, loss) in enumerate(curve):
        log.append({"epoch": epoch, "step": 10 * (i + 1), "train_loss": loss,
                    "train_loss_no_l2": loss - 0.01, "test_loss": loss + 1,
                    "test_accuracy": 0.5 if task_type == "classification" else None,
                    "cpu_seconds": cpu, "wall_seconds": cpu / 2})
    last = curve[-1][2] if status == "finished" else None
    write_status(d, {"task": task, "method": method, "preset": method, "seed": seed,
                     "status": status, "message": "m", "task_type": task_type,
                     "final_train_loss": last, "best_train_loss": last, "epochs": curve[-1][0],
                     "final_test_loss": last and last + 1, "steps_per_second": 5.0,
                     "final_test_accuracy": 0.5 if task_type == "classification" else None,
                     "peak_memory_mb": 100.0 + seed, "memory_start_mb": 50.0,
                     "optimizer_state_mb": 1.0,
                     "steps": 10 * len(curve)})
    return d


def test_report_tables_time_to_target_and_plots(tmp_path):
    root = tmp_path / "sweep"
    for seed in (0, 1):
        _fake_run(root, "curves", "fast", seed, [(1, 1.0, 8.0), (2, 2.0, 4.0), (3, 3.0, 2.0)])
        _fake_run(root, "curves", "slow", seed, [(1, 1.5, 9.0), (2, 3.0, 6.0), (3, 4.5, 5.0 + seed)])
    _fake_run(root, "curves", "slow", 2, [(1, 1.0, 9.0)], status="diverged")
    report = write_report(root)

    runs = read_csv(root / "runs.csv")
    assert len(runs) == 5
    groups = {r["method"]: r for r in read_csv(root / "report.csv")}
    assert set(groups) == {"fast", "slow"}
    slow, fast = groups["slow"], groups["fast"]
    assert slow["runs"] == "3" and slow["finished"] == "2" and slow["diverged"] == "1"
    assert float(slow["final_train_loss_mean"]) == pytest.approx(5.5)
    # auto target = worst mean final loss (5.5): 'fast' reaches it at its 2nd evaluation
    assert float(fast["target_loss"]) == pytest.approx(5.5)
    assert float(fast["cpu_seconds_to_target_mean"]) == pytest.approx(2.0)
    assert slow["reached_target"] == "1/2" and slow["cpu_seconds_to_target_mean"] == ""
    assert float(slow["peak_memory_mb_max"]) == pytest.approx(102.0)
    assert float(slow["memory_growth_mb_max"]) == pytest.approx(52.0)

    md = (root / "report.md").read_text()
    assert "| curves | fast | 2/2 |" in md and "| curves | slow | 2/3 (1 div.) |" in md
    assert "## Runs that did not finish" in md
    assert report.markdown in md
    pngs = sorted(p.name for p in (root / "plots").glob("*.png"))
    assert pngs == ["curves_loss_vs_epoch.png", "curves_loss_vs_time.png",
                    "curves_test_vs_epoch.png"]
    for p in (root / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_report_explicit_target_and_single_run(tmp_path):
    d = _fake_run(tmp_path, "digits", "adam", 0, [(1, 1.0, 3.0), (2, 2.0, 1.0)],
                  task_type="classification")
    report = write_report(d, target_loss=2.5, plots=False)
    assert report.groups[0]["cpu_seconds_to_target_mean"] == 2.0
    assert report.groups[0]["test_metric"] == "test_accuracy"
    assert "50.00% acc" in report.markdown


def test_report_on_a_directory_without_runs(tmp_path):
    from kfqn.runner.errors import RunDirError

    with pytest.raises(RunDirError, match="holds no runs"):
        write_report(tmp_path)
    with pytest.raises(RunDirError, match="does not exist"):
        write_report(tmp_path / "nope")


def _two_task_sweep(root):
    for seed in (0, 1):
        _fake_run(root, "curves", "a", seed, [(0, 0.0, 500.0), (1, 1.0, 160.0), (2, 2.0, 120.0)])
        _fake_run(root, "digits", "a", seed, [(0, 0.0, 2.3), (1, 1.0, 0.5), (2, 2.0, 0.04)],
                  task_type="classification")


def test_report_targets_per_task_and_flags_meaningless_ones(tmp_path, capsys):
    from kfqn import cli

    root = tmp_path / "sweep"
    _two_task_sweep(root)
    # one number for both tasks: every digits run starts below 150 -> flagged, not "0 s"
    report = write_report(root, target_loss=150.0, plots=False)
    by_task = {g["task"]: g for g in report.groups}
    assert by_task["curves"]["cpu_seconds_to_target_mean"] == 2.0
    assert by_task["digits"]["cpu_seconds_to_target_mean"] is None
    assert any("every run of digits starts below the target 150" in n for n in report.notes)
    # per task: both meaningful
    report = write_report(root, target_loss={"curves": 150.0, "digits": 0.05}, plots=False)
    by_task = {g["task"]: g for g in report.groups}
    assert by_task["curves"]["cpu_seconds_to_target_mean"] == 2.0
    assert by_task["digits"]["cpu_seconds_to_target_mean"] == 2.0 and not report.notes
    # a target no run reaches is flagged too
    report = write_report(root, target_loss={"curves": 1.0, "digits": 0.05}, plots=False)
    assert any("no run of curves reaches the target 1" in n for n in report.notes)
    # the same from the command line, and a misspelt task is one line
    assert cli.main(["report", str(root), "--target-loss", "curves=150,digits=0.05",
                     "--no-plots"]) == 0
    assert "target loss for digits: 0.05" in (root / "report.md").read_text()
    capsys.readouterr()
    assert cli.main(["report", str(root), "--target-loss", "curvse=150", "--no-plots"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Did you mean 'curves'" in err


def test_report_target_from_the_config_mapping(tmp_path):
    from omegaconf import OmegaConf

    root = tmp_path / "sweep"
    _two_task_sweep(root)
    for d in root.glob("*/*/seed*"):
        OmegaConf.save(OmegaConf.create({"report": {"target_loss": {"curves": 150, "digits":
                                                                      0.05}}}), d / "config.yaml")
    report = write_report(root, plots=False)
    assert {g["task"]: g["target_loss"] for g in report.groups} == {"curves": 150,
                                                                    "digits": 0.05}


def test_a_sweep_report_holds_only_the_sweeps_runs(tmp_path):
    import json

    root = tmp_path / "sweep"
    mine = _fake_run(root, "curves", "a", 0, [(0, 0.0, 5.0), (1, 1.0, 4.0)])
    _fake_run(root / "train", "curves", "a", 0, [(0, 0.0, 5.0), (1, 1.0, 1.0)])
    (root / "sweep.json").write_text(json.dumps({"runs": [{"run_dir": str(mine)}]}))
    report = write_report(root, plots=False)
    assert len(report.runs) == 1 and report.groups[0]["final_train_loss_mean"] == 4.0


def test_a_task_whose_runs_all_diverged_says_why(tmp_path):
    root = tmp_path / "sweep"
    _fake_run(root, "curves", "a", 0, [(0, 0.0, 5.0)], status="diverged")
    report = write_report(root)
    assert any("no run of curves finished (diverged)" in n for n in report.notes)
    assert "no run of curves finished" in (root / "report.md").read_text()
    assert not list((root / "plots").glob("*.png")) if (root / "plots").exists() else True


def test_accuracy_plots_use_a_linear_axis(tmp_path, monkeypatch):
    import matplotlib.axes

    calls = []
    orig = matplotlib.axes.Axes.set_yscale
    monkeypatch.setattr(matplotlib.axes.Axes, "set_yscale",
                        lambda self, v, **k: (calls.append((self, v)), orig(self, v, **k)))
    root = tmp_path / "sweep"
    _fake_run(root, "digits", "a", 0, [(0, 0.0, 2.3), (1, 1.0, 0.5), (2, 2.0, 0.04)],
              task_type="classification")
    d = root / "digits" / "a" / "seed0"
    rows = read_csv(d / "epochs.csv")
    # accuracies spanning more than a factor 3: a loss would get a log axis, accuracy must not
    from kfqn.runner.logs import EPOCH_COLUMNS, CsvLog

    log = CsvLog(d / "epochs.csv", EPOCH_COLUMNS)
    for r, acc in zip(rows, (0.1, 0.6, 0.97)):
        log.append({**{k: (float(v) if v not in ("", None) else None) for k, v in r.items()},
                    "test_accuracy": acc})
    write_report(root)
    scales = [(ax.get_ylabel(), v) for ax, v in calls]  # labels are set after the scale
    assert ("training loss incl. L2", "log") in scales  # losses 2.3 -> 0.04: log axis
    assert not any(label == "test accuracy" and v == "log" for label, v in scales)
