"""``kfqn train`` on N ranks (gloo, CPU): a 2-rank run follows the 1-rank run at equal global
batch, an interrupted 2-rank run resumed (under torchrun) equals the uninterrupted one, only
rank 0 writes files, a failing rank ends the run with its error named, and launch mistakes are
one-line errors.

The runs are the quickstart digits task with the same CNN in float64 (a run-config plugin
written by the test), so that the ranks and one rank agree to round-off. Every launch is a
subprocess (own session) with a timeout, the ranks' collectives time out after 60 s, and the
independent launches run at the same time to keep the file short on 2 cores.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from kfqn import cli
from kfqn.runner import distributed as D
from kfqn.runner.checkpoint import load_checkpoint
from kfqn.runner.errors import ConfigError
from kfqn.runner.logs import read_csv

from helpers import tensors_of

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

PLUGIN = '''
"""Test models of tests/runner/test_runner_distributed.py (a run-config plugin)."""
import os

import torch
from torch import nn

from kfqn.core.hookspecs import hookimpl
from kfqn.runner.models.cnns import DigitsCnn


class _Double(nn.Module):
    def forward(self, x):
        return x.double()


class DigitsCnn64(DigitsCnn):
    name = "digits_cnn64"
    description = "digits_cnn in float64 (tests)"

    def build(self, input_shape, num_classes, **options):
        net = super().build(input_shape, num_classes, **options)
        return nn.Sequential(_Double(), net).double()


class _FailOnRank1(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if os.environ.get("RANK") == "1" and self.calls > 4:
                raise RuntimeError("boom on rank 1")
        return self.inner(x)


class DigitsCnnFail(DigitsCnn64):
    name = "digits_cnn_fail"
    description = "digits_cnn64 whose rank 1 fails in its third step (tests)"

    def build(self, input_shape, num_classes, **options):
        return _FailOnRank1(super().build(input_shape, num_classes, **options))


@hookimpl
def kfqn_models():
    return [DigitsCnn64, DigitsCnnFail]
'''

TASK = ["quickstart", "task=digits", "optimizer.preset=kbfgs", "optimizer.factor_dtype=float64",
        "model.name=digits_cnn64", "plugins=[kfqn_dist_testplugin]", "-q"]
LAUNCH_TIMEOUT = 300  # seconds per launch (the ranks' collectives give up after 60)
RUN_FILES = {"config.yaml", "status.json", "steps.csv", "epochs.csv", "checkpoint.pt"}


def _env(plugin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "KFQN_OVERRIDES") and not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugin_dir),
                                                      os.environ.get("PYTHONPATH")]))
    env["KFQN_DIST_TIMEOUT"] = "60"
    env["OMP_NUM_THREADS"] = "1"
    return env


class Launch:
    """One ``kfqn train`` (or torchrun) subprocess in its own session, with a deadline."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.argv = argv
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, *argv], env=env, cwd=cwd, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.out = self.err = ""
        self.rc: int | None = None
        self.seconds = 0.0

    def wait(self) -> "Launch":
        if self.rc is not None:
            return self
        left = max(1.0, LAUNCH_TIMEOUT - (time.perf_counter() - self.t0))
        try:
            self.out, self.err = self.proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the launcher and its ranks
            self.out, self.err = self.proc.communicate()
            pytest.fail(f"{' '.join(self.argv)} hung for {LAUNCH_TIMEOUT} s:\n{self.err[-3000:]}")
        self.rc = self.proc.returncode
        self.seconds = time.perf_counter() - self.t0
        return self

    def ok(self) -> "Launch":
        self.wait()
        assert self.rc == 0, f"{' '.join(self.argv)}: exit {self.rc}\n{self.out[-2000:]}" \
                             f"\n{self.err[-3000:]}"
        return self


def _kfqn(*args: str) -> list[str]:
    return ["-m", "kfqn", "train", *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    (root / "plugin").mkdir()
    (root / "plugin" / "kfqn_dist_testplugin.py").write_text(PLUGIN)
    env = _env(root / "plugin")
    d = {name: root / "runs" / name
         for name in ("one", "two", "three", "fail", "slurm", "kfac_one", "owner")}

    def start(argv, extra=None):
        return Launch(argv, {**env, **(extra or {})}, root)

    # K-FAC (sampled Fisher) as two tasks of an srun step (no launcher process: each reads its
    # SLURM variables), and on one rank
    port = _free_port()
    kfac = [*TASK, "optimizer.preset=kfac", "budget.steps=6"]
    slurm = [start(_kfqn(*kfac, f"logging.run_dir={d['slurm']}"),
                   {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "SLURM_STEP_NUM_TASKS": "2",
                    "SLURM_NTASKS": "2", "SLURM_JOB_ID": "4242", "MASTER_PORT": str(port),
                    "SLURM_STEP_NODELIST": "localhost"})
             for r in range(2)]

    launches = {
        "two": start(_kfqn(*TASK, "budget.steps=6", f"logging.run_dir={d['two']}",
                           "--nproc", "2")),
        "three": start(_kfqn(*TASK, "budget.steps=3", f"logging.run_dir={d['three']}",
                             "--nproc", "2")),
        "one": start(_kfqn(*TASK, "budget.steps=6", f"logging.run_dir={d['one']}",
                           "--nproc", "1")),
        "kfac_one": start(_kfqn(*kfac, f"logging.run_dir={d['kfac_one']}")),
        "fail": start(_kfqn(*TASK, "budget.steps=6", "model.name=digits_cnn_fail",
                            f"logging.run_dir={d['fail']}", "--nproc", "2")),
        # factors on their owner ranks; 3 steps, then resumed below to 6 (replicated)
        "owner": start(_kfqn(*TASK, "budget.steps=3", "optimizer.placement=owner",
                             f"logging.run_dir={d['owner']}", "--nproc", "2")),
    }
    launches["three"].ok()
    three_before = _status(d["three"])
    # the interrupted run goes on to step 6 under torchrun (its own rank environment)
    launches["resume"] = start(["-m", "torch.distributed.run", "--standalone",
                                "--nproc-per-node", "2", "-m", "kfqn", "train", str(d["three"]),
                                "--resume", "budget.steps=6", "-q"])
    launches["owner"].ok()
    launches["owner_resume"] = start(_kfqn(str(d["owner"]), "--resume", "budget.steps=6",
                                           "optimizer.placement=replicated", "--nproc", "2"))
    for launch in [*launches.values(), *slurm]:
        launch.wait()
    return {"dirs": d, "root": root, "slurm": slurm, "three_before": three_before, **launches}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir)["model"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


# -- (a) two ranks follow one rank --------------------------------------------------------------
def test_two_ranks_follow_one_rank(runs):
    one, two = runs["dirs"]["one"], runs["dirs"]["two"]
    runs["one"].ok(), runs["two"].ok()
    s1, s2 = _status(one), _status(two)
    assert s1["status"] == s2["status"] == "finished" and s1["steps"] == s2["steps"] == 6
    assert s2["world_size"] == 2 and "world_size" not in s1
    # it trained
    first = read_csv(one / "epochs.csv")[0]
    assert abs(float(first["train_loss"]) - s1["final_train_loss"]) > 1e-4
    loss_gap = abs(s1["final_train_loss"] - s2["final_train_loss"])
    param_gap = _max_diff(_params(one), _params(two))
    print(f"1 rank vs 2 ranks: final train loss {loss_gap:.2e}, parameters {param_gap:.2e}")
    assert loss_gap < 1e-5 and param_gap < 1e-5
    assert param_gap < 1e-9, "float64: the ranks should agree with one rank to round-off"
    # the logged batch losses are the global batch's
    rows1, rows2 = read_csv(one / "steps.csv"), read_csv(two / "steps.csv")
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2]
    for r1, r2 in zip(rows1, rows2):
        assert abs(float(r1["loss"]) - float(r2["loss"])) < 1e-9
    assert "(2 ranks)" in runs["two"].out and "finished" in runs["two"].out


# -- (b) an interrupted 2-rank run resumed (under torchrun) equals the uninterrupted one ---------
def test_resumed_two_rank_run_equals_uninterrupted(runs):
    three, two = runs["dirs"]["three"], runs["dirs"]["two"]
    assert runs["three_before"]["steps"] == 3 and runs["three_before"]["world_size"] == 2
    runs["two"].ok(), runs["resume"].ok()
    assert _status(three)["status"] == "finished" and _status(three)["steps"] == 6
    assert _max_diff(_params(three), _params(two)) <= 1e-12
    a = load_checkpoint(three)
    b = load_checkpoint(two)
    assert a["loader"]["pos"] == b["loader"]["pos"]
    assert torch.equal(a["loader"]["perm"], b["loader"]["perm"])
    assert _losses(three) == _losses(two)


# -- placement=owner: checkpointed from the owners, resumed replicated: the same run ---------------
def test_owner_placement_checkpoint_resumes(runs):
    owner, two = runs["dirs"]["owner"], runs["dirs"]["two"]
    runs["owner_resume"].ok(), runs["two"].ok()
    assert _status(owner)["status"] == "finished" and _status(owner)["steps"] == 6
    # every layer's factors, whoever owned them, as in a replicated run's checkpoint
    ckpt, ref = load_checkpoint(owner)["optimizer"], load_checkpoint(two)["optimizer"]
    assert ckpt["layers"].keys() == ref["layers"].keys() and len(ckpt["layers"]) == 4
    assert not any(t.is_meta for t in tensors_of(ckpt["layers"]))
    assert _max_diff(_params(owner), _params(two)) < 1e-9


def _losses(run_dir: Path) -> list[tuple[str, float]]:
    return [(r["step"], float(r["loss"])) for r in read_csv(run_dir / "steps.csv")]


# -- SLURM: K-FAC from srun's variables, two ranks follow one -----------------------------------
def test_slurm_tasks_follow_one_rank_with_kfac(runs):
    rank0, rank1 = (launch.ok() for launch in runs["slurm"])
    assert "(2 ranks)" in rank0.out and not rank1.out.strip()  # rank 0 reports
    one, two = runs["dirs"]["kfac_one"], runs["dirs"]["slurm"]
    runs["kfac_one"].ok()
    assert _status(two)["world_size"] == 2 and _status(two)["preset"] == "kfac"
    assert abs(_status(one)["final_train_loss"] - _status(two)["final_train_loss"]) < 1e-9
    assert _max_diff(_params(one), _params(two)) < 1e-9


# -- (c) only rank 0 writes ----------------------------------------------------------------------
def test_only_rank_zero_writes(runs):
    runs["two"].ok(), runs["one"].ok()
    for name in ("one", "two"):
        run_dir = runs["dirs"][name]
        names = {p.name for p in run_dir.iterdir()}
        events = {n for n in names if n.startswith("events.out.tfevents.")}
        assert names - events == RUN_FILES, (name, names)
        # TensorBoard files are named after the writing process: one process wrote them all
        assert len({n.split(".")[-2] for n in events}) == 1, events
    # nothing written anywhere else (e.g. by another rank that computed another directory)
    written = {p.relative_to(runs["root"] / "runs").parts[0]
               for p in (runs["root"] / "runs").rglob("*")}
    assert written <= set(runs["dirs"])
    # each row logged once (a second rank appending would double them)
    for log in ("steps.csv", "epochs.csv"):
        assert len(read_csv(runs["dirs"]["two"] / log)) == len(read_csv(runs["dirs"]["one"] / log))


# -- a failing rank ends the run, named ----------------------------------------------------------
def test_failing_rank_ends_every_rank_with_its_error(runs):
    fail = runs["fail"].wait()
    assert fail.rc == 1, fail.err[-3000:]
    lines = [ln for ln in fail.err.splitlines() if ln.startswith("kfqn train:")]
    assert len(lines) == 1, fail.err[-3000:]
    assert "rank 1 of 2" in lines[0] and "RuntimeError: boom on rank 1" in lines[0], lines[0]
    run_dir = runs["dirs"]["fail"]
    status = _status(run_dir)
    assert status["status"] == "failed" and "boom on rank 1" in status["message"]
    assert "boom on rank 1" in (run_dir / "error.txt").read_text()


# -- (d) launch mistakes: one line, exit status 2 ------------------------------------------------
def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("nproc", ["0", "-2", "two"])
def test_bad_nproc_is_a_usage_error(nproc, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "quickstart", "--nproc", nproc])
    assert e.value.code == 2
    assert f"invalid --nproc '{nproc}'" in _one_line(capsys)


def test_batch_not_divisible_by_ranks(tmp_path, capsys):
    argv = ["train", "quickstart", "task=digits", f"logging.root={tmp_path}", "--nproc", "3"]
    assert cli.main(argv) == 2
    err = _one_line(capsys)
    assert "data.batch_size = 128 (the global batch) is not divisible by the 3 ranks" in err
    assert not any(tmp_path.iterdir())  # nothing launched, nothing written


def test_nproc_under_a_launcher(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = ["train", "quickstart", "task=digits", f"logging.root={tmp_path}", "--nproc", "2"]
    assert cli.main(argv) == 2
    assert "already rank 0 of 2 (torchrun); leave --nproc out" in _one_line(capsys)


# -- the environment -----------------------------------------------------------------------------
def test_detect_torchrun_slurm_and_single():
    assert not D.detect({}).distributed
    tr = D.detect({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                   "MASTER_PORT": "29500"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.master_addr, tr.master_port,
            tr.launcher) == (1, 4, 1, "h", 29500, "torchrun")
    slurm = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
             "SLURM_NTASKS": "8", "SLURM_JOB_ID": "123456",
             "SLURM_STEP_NODELIST": "gpu[007-009,12],cpu1"}
    s = D.detect(slurm)
    assert (s.rank, s.world_size, s.local_rank, s.master_addr, s.launcher) == (
        3, 8, 1, "gpu007", "slurm")
    assert s.master_port == 15000 + 123456 % 20000
    assert D.detect({**slurm, "MASTER_ADDR": "x", "MASTER_PORT": "1234"}).master_port == 1234
    # a batch script's own shell (no srun step) is one process, whatever --ntasks says
    assert not D.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}
                        ).distributed
    # torchrun's variables win inside a SLURM allocation
    assert D.detect({**slurm, "RANK": "0", "WORLD_SIZE": "2"}).launcher == "torchrun"
    assert D.first_host("node1") == "node1"
    assert D.first_host("a-[1-2],b3") == "a-1"


@pytest.mark.parametrize("env,pattern", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, r"\$RANK = 'x' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is not below the world size 2"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, r"\$WORLD_SIZE = 0 must be >= 1"),
])
def test_bad_environment_is_one_config_error(env, pattern):
    with pytest.raises(ConfigError, match=pattern):
        D.detect(env)


def test_timeout_and_batch_checks():
    assert D.timeout_seconds({}) == D.DEFAULT_TIMEOUT
    assert D.timeout_seconds({D.ENV_TIMEOUT: "12.5"}) == 12.5
    with pytest.raises(ConfigError, match="KFQN_DIST_TIMEOUT"):
        D.timeout_seconds({D.ENV_TIMEOUT: "-1"})
    D.check_batch(128, 2, 1438, drop_last=False)  # 1438 % 128 = 30 splits in two
    with pytest.raises(ConfigError, match="use a multiple of 4 \\(e.g. 8 or 12\\)"):
        D.check_batch(10, 4)
    with pytest.raises(ConfigError, match="last batch of each epoch holds 33"):
        D.check_batch(128, 2, 1441, drop_last=False)
    D.check_batch(128, 2, 1441, drop_last=True)
    ctx = D.DistContext(rank=1, world_size=4)
    assert ctx.rows(8) == slice(2, 4) and not ctx.is_main
    x = torch.arange(8)
    assert torch.equal(torch.cat([D.DistContext(r, 4).shard(x)[0] for r in range(4)]), x)
