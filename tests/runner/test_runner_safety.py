"""Nothing is lost: --overwrite validates first, sweeps never take over foreign runs, checkpoints
are atomic, verified and kept in twos, names stay inside the runs root, bad input is one line."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from kfqn import cli
from kfqn.runner import checkpoint as ck
from kfqn.runner.data.base import DataSplits
from kfqn.runner.errors import DataError
from kfqn.runner.trainer import _check_finite, train_run


def write_config(tmp_path, **extra):
    cfg = {
        "name": "safe",
        "data": {"name": "digits", "root": str(tmp_path / "data"), "batch_size": 256},
        "model": {"name": "mlp_autoencoder", "options": {"hidden": [8], "code": 2}},
        "optimizer": {"preset": "adam", "lr": 0.01},
        "budget": {"steps": 3},
        "logging": {"root": str(tmp_path / "runs"), "progress": False},
        "sweep": {"fresh_process": False},
    }
    cfg.update(extra)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


TYPOS = ["optimizer.lrr=0.1", "data.name=digitz", "model.name=mlp_autoencodr",
         "optimizer.g_side.damping=ddv3", "budget.stepz=3", "optimizer.preset=kbgfs"]


@pytest.mark.parametrize("typo", TYPOS)
def test_overwrite_with_a_typo_deletes_nothing(tmp_path, capsys, typo):
    cfg = write_config(tmp_path)
    assert cli.main(["train", str(cfg), "-q"]) == 0
    before = snapshot(tmp_path / "runs")
    assert cli.main(["train", str(cfg), typo, "--overwrite", "-q"]) == 2
    err = one_line(capsys)
    key, value = typo.split("=")
    assert any(t in err for t in (repr(value), repr(key.split(".")[-1]), repr(key))), err
    assert snapshot(tmp_path / "runs") == before
    # sweeps too: the whole sweep is validated before any run is replaced
    assert cli.main(["sweep", str(cfg), "-q", "--no-report"]) == 0
    before = snapshot(tmp_path / "runs")
    assert cli.main(["sweep", str(cfg), "name=safe", typo, "--overwrite", "-q"]) == 2
    one_line(capsys)
    assert snapshot(tmp_path / "runs") == before


def test_overwrite_replaces_a_run_once_the_new_one_is_built(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert cli.main(["train", str(cfg), "-q"]) == 0
    run = tmp_path / "runs" / "safe" / "train" / "main" / "adam" / "seed0"
    (run / "stale.txt").write_text("old")
    assert cli.main(["train", str(cfg), "--overwrite", "budget.steps=5", "-q"]) == 0
    assert not (run / "stale.txt").exists()
    assert json.loads((run / "status.json").read_text())["steps"] == 5


def test_overrides_name_the_run_directory(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert cli.main(["train", str(cfg), "-q"]) == 0
    assert cli.main(["train", str(cfg), "optimizer.lr=0.1", "budget.steps=2", "-q"]) == 0
    base = tmp_path / "runs" / "safe" / "train" / "main"
    assert sorted(p.name for p in base.iterdir()) == ["adam", "adam-lr=0.1"]
    # a budget change is not a new experiment: the same run, refused without --resume
    assert cli.main(["train", str(cfg), "budget.steps=9", "-q"]) == 2
    assert "--resume" in one_line(capsys)


def test_a_sweep_never_takes_over_runs_it_did_not_make(tmp_path, capsys):
    cfg = write_config(tmp_path)
    target = tmp_path / "runs" / "safe" / "main" / "adam" / "seed0"
    assert cli.main(["train", str(cfg), f"logging.run_dir={target}", "budget.steps=6",
                     "-q"]) == 0
    before = snapshot(target)
    assert cli.main(["sweep", str(cfg), "-q"]) == 2
    assert "already hold runs" in one_line(capsys)
    assert snapshot(target) == before
    assert not (tmp_path / "runs" / "safe" / "sweep.json").exists()


def test_sweep_resume_refuses_another_experiment_and_keeps_its_record(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert cli.main(["sweep", str(cfg), "-q", "--no-report"]) == 0
    sweep = tmp_path / "runs" / "safe"
    record = {f: (sweep / f).read_text() for f in ("sweep.yaml", "overrides.txt")}
    assert cli.main(["sweep", str(cfg), "name=safe", "optimizer.lr=0.5", "--resume", "-q"]) == 2
    assert "made with another config (optimizer.lr" in one_line(capsys)
    assert {f: (sweep / f).read_text() for f in record} == record
    # the sweep directory itself is accepted; a budget change is fine on resume
    assert cli.main(["sweep", str(sweep), "--resume", "budget.steps=4", "-q", "--no-report"]) == 0
    assert {f: (sweep / f).read_text() for f in record} == record
    # with overrides (and no name) a sweep gets a directory of its own
    assert cli.main(["sweep", str(cfg), "optimizer.lr=0.5", "-q", "--no-report"]) == 0
    assert (tmp_path / "runs" / "safe-lr=0.5" / "sweep.json").exists()


@pytest.mark.parametrize("args,pattern", [
    (["name=../../escaped"], "must be one directory name"),
    (["name=a/b"], "must be one directory name"),
    (["seed=99999999999999999999"], r"seed = 99999999999999999999 is out of range"),
    (["optimizer.lr=1e308"], "does not fit in float32"),
    (["data.batch_size=2000"], "larger than the training set"),
    (["sweep.grid=5"], None),  # kfqn train ignores the sweep section
])
def test_bad_values_are_one_line_and_create_nothing(tmp_path, capsys, args, pattern):
    cfg = write_config(tmp_path)
    code = cli.main(["train", str(cfg), *args, "-q"])
    if pattern is None:
        assert code == 0
        return
    assert code == 2
    assert re.search(pattern, one_line(capsys))
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "escaped").exists()


def test_sweep_grid_and_logging_root_errors(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert cli.main(["sweep", str(cfg), "sweep.grid=5"]) == 2
    assert "sweep.grid = 5 must be a mapping" in one_line(capsys)
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["train", str(cfg), f"logging.root={afile}", "-q"]) == 2
    assert "cannot create the run directory" in one_line(capsys)
    assert cli.main(["sweep", str(cfg), f"logging.root={afile}", "-q"]) == 2
    one_line(capsys)
    assert afile.read_text() == "x"


# -- checkpoints ------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_any_damage_to_a_checkpoint_is_detected(data):
    state = {"w": torch.arange(6.0), "step": data.draw(st.integers(0, 100))}
    blob = ck.encode(state)
    assert ck.decode(blob)["step"] == state["step"]
    kind = data.draw(st.sampled_from(["truncate", "flip", "append"]))
    if kind == "truncate":
        bad = blob[:data.draw(st.integers(0, len(blob) - 1))]
    elif kind == "flip":
        i = data.draw(st.integers(0, len(blob) - 1))
        bad = blob[:i] + bytes([blob[i] ^ data.draw(st.integers(1, 255))]) + blob[i + 1:]
    else:
        bad = blob + data.draw(st.binary(min_size=1, max_size=8))
    with pytest.raises(Exception):
        ck.decode(bad)


def _finished_run(tmp_path, tiny, sgd, epochs=3):
    cfg = tiny(budget={"epochs": epochs}, logging={"checkpoint_every_seconds": 0})
    run = tmp_path / "run"
    train_run(cfg, run, quiet=True)
    return cfg, run


def test_checkpoints_keep_the_last_two_and_fall_back(tmp_path, tiny, sgd):
    cfg, run = _finished_run(tmp_path, tiny, sgd)
    new, old = ck.load_checkpoint(run), ck.decode((run / ck.PREVIOUS).read_bytes())
    assert new["state"]["step"] > old["state"]["step"]
    status = (run / "status.json").read_text()
    data = (run / ck.CHECKPOINT).read_bytes()
    (run / ck.CHECKPOINT).write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    with pytest.warns(UserWarning, match="checksum mismatch.*older checkpoint"):
        got = ck.load_checkpoint(run)
    assert got["state"]["step"] == old["state"]["step"]
    # resume from the older one repeats the steps in between and finishes as before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train_run(cfg, run, resume=True, quiet=True)
    assert result.status == "finished"
    assert result.summary["steps"] == json.loads(status)["steps"]


def test_no_usable_checkpoint_is_one_line_and_keeps_the_summary(tmp_path, tiny, sgd, capsys):
    cfg, run = _finished_run(tmp_path, tiny, sgd)
    status = (run / "status.json").read_text()
    for name in (ck.CHECKPOINT, ck.PREVIOUS):
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError) as e:
        train_run(cfg, run, resume=True, quiet=True)
    msg = str(e.value)
    assert "\n" not in msg and "truncated" in msg and "--overwrite" in msg
    assert (run / "status.json").read_text() == status
    assert cli.main(["train", str(run), "--resume", "-q"]) == 2
    assert "no usable checkpoint" in one_line(capsys)
    assert (run / "status.json").read_text() == status


def test_a_killed_save_leaves_the_old_checkpoint_and_its_temporary_is_removed(
        tmp_path, tiny, sgd, monkeypatch):
    cfg, run = _finished_run(tmp_path, tiny, sgd, epochs=1)
    before = (run / ck.CHECKPOINT).read_bytes()

    def killed(*a, **k):  # the process dies between writing the temporary file and the rename
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(ck.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            ck.save_checkpoint(run, {"x": 1})
    assert (run / ck.CHECKPOINT).read_bytes() == before
    stale = run / f".{ck.CHECKPOINT}.99999.tmp"  # as a SIGKILL would leave it
    stale.write_bytes(b"partial")
    train_run(tiny(budget={"epochs": 2}, logging={"checkpoint_every_seconds": 0}), run,
              resume=True, quiet=True)
    assert not stale.exists()
    assert not list(run.glob(".*.tmp"))


# -- data ---------------------------------------------------------------------------------------
def test_nan_inputs_are_reported_as_data_not_divergence():
    x = torch.rand(10, 1, 2, 2)
    x[7, 0, 1, 1] = float("nan")
    ok = TensorDataset(torch.rand(4, 1, 2, 2), torch.zeros(4))
    splits = DataSplits(TensorDataset(x, torch.zeros(10)), ok, (1, 2, 2), None)
    with pytest.raises(DataError, match=r"training inputs are not finite \(1 of 10 .* index 7"):
        _check_finite(splits, "toy")
    _check_finite(DataSplits(ok, ok, (1, 2, 2), None), "toy")  # finite: no error


# -- Ctrl-C on a sweep with worker processes -------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_on_a_sweep_stops_the_queue_checkpoints_and_resumes(tmp_path):
    cfg = write_config(tmp_path, budget={"seconds": 60, "steps": 100000},
                       sweep={"seeds": [0, 1, 2], "workers": 2})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("KFQN_OVERRIDES", None)
    proc = subprocess.Popen([sys.executable, "-m", "kfqn.cli", "sweep", str(cfg), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=tmp_path)
    sweep = tmp_path / "runs" / "safe"
    deadline = time.time() + 120
    while time.time() < deadline:  # both running runs past their first steps
        states = [json.loads(p.read_text()).get("status") for p in sweep.glob("*/*/*/status.json")]
        if states.count("running") == 2 and len(list(sweep.glob("*/*/*/steps.csv"))) == 2:
            break
        time.sleep(0.3)
    time.sleep(1.5)
    t_int = time.time()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert time.time() - t_int < 30  # the running runs did not spend their 60 s budgets
    index = json.loads((sweep / "sweep.json").read_text())
    assert index["state"] == "interrupted" and index["resume"] == f"kfqn sweep {sweep} --resume"
    statuses = [r["status"] for r in index["runs"]]
    assert statuses.count("interrupted") == 2 and statuses.count("pending") == 1
    for r in index["runs"]:
        if r["status"] == "interrupted":
            assert ck.load_checkpoint(Path(r["run_dir"])) is not None
        else:
            assert not Path(r["run_dir"]).exists()  # the queued run never started
    assert f"kfqn sweep {sweep} --resume" in out
    done = subprocess.run([sys.executable, "-m", "kfqn.cli", "sweep", str(sweep), "--resume",
                           "budget.seconds=2", "-q", "--no-report"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    index = json.loads((sweep / "sweep.json").read_text())
    assert index["state"] == "done" and {r["status"] for r in index["runs"]} == {"finished"}
