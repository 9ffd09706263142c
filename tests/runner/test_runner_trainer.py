"""The training loop: logs, L2 term, budgets, resume, divergence, warm start, TensorBoard."""
from __future__ import annotations

import json

import pytest
import torch

from kfqn.core.errors import ConfigError
from kfqn.runner.checkpoint import load_checkpoint
from kfqn.runner.logs import read_csv
from kfqn.runner.trainer import train_run

LOSS_COLUMNS = ("train_loss", "train_loss_no_l2", "test_loss", "batch_loss_mean")


def params(run_dir):
    return load_checkpoint(run_dir)["model"]


def losses(run_dir, name="epochs.csv", cols=LOSS_COLUMNS):
    return [(r["step"],) + tuple(r[c] for c in cols) for r in read_csv(run_dir / name)]


def status(run_dir):
    return json.loads((run_dir / "status.json").read_text())


def test_run_logs_and_l2_term(tiny, tmp_path):
    cfg = tiny()
    run_dir = tmp_path / "run"
    result = train_run(cfg, run_dir, quiet=True)
    assert result.status == "finished"
    for f in ("config.yaml", "status.json", "steps.csv", "epochs.csv", "checkpoint.pt"):
        assert (run_dir / f).exists()
    assert list(run_dir.glob("events.out.tfevents.*"))
    rows = read_csv(run_dir / "epochs.csv")
    assert [float(r["epoch"]) for r in rows] == [0.0, 1.0, 2.0]  # a first evaluation at start
    assert rows[0]["step"] == "0" and float(rows[0]["cpu_seconds"]) == 0.0
    # reported loss = loss + (tau/2)||theta||^2 with tau the optimizer's weight decay
    tau = result.summary["l2_tau"]
    assert tau == pytest.approx(1e-5)  # the kbfgs preset's default
    sq = sum(float((p.double() ** 2).sum()) for k, p in params(run_dir).items())
    last = rows[-1]
    assert float(last["train_loss"]) - float(last["train_loss_no_l2"]) == pytest.approx(
        0.5 * tau * sq, rel=1e-4)
    s = status(run_dir)
    assert s["status"] == "finished" and s["steps"] == 2 * (1437 // 128)
    assert s["final_train_loss"] == pytest.approx(float(last["train_loss"]))
    assert s["peak_memory_mb"] > 0 and s["optimizer_state_mb"] > 0
    assert "forward_backward" in s["phase_seconds"] or s["phase_seconds"]


def test_tensorboard_tags(tiny, tmp_path, sgd):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train_run(tiny(model={"name": "digits_cnn", "options": {"width": 0.25}}), run_dir,
              quiet=True, identity={"task": "t", "preset": "kbfgs", "seed": 0, "method": "kbfgs"})
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss_no_l2", "train/lr", "time/step_seconds",
            "time/phase/total", "stats/all/param_norm", "epoch/train_loss", "test/loss",
            "test/accuracy"} <= tags
    assert "hparams/final_train_loss" in tags  # the HParams entry, written into this run dir
    acc_rows = read_csv(run_dir / "epochs.csv")
    assert 0.0 <= float(acc_rows[-1]["test_accuracy"]) <= 1.0


def test_step_and_time_budgets(tiny, tmp_path, sgd):
    r = train_run(tiny(budget={"epochs": None, "steps": 3}), tmp_path / "a", quiet=True)
    assert r.summary["steps"] == 3 and "steps" in r.message
    assert [r["step"] for r in read_csv(tmp_path / "a" / "epochs.csv")] == ["0", "3"]
    r = train_run(tiny(budget={"epochs": None, "cpu_seconds": 1e-6}), tmp_path / "b", quiet=True)
    assert r.summary["steps"] == 1 and "cpu_seconds" in r.message
    r = train_run(tiny(budget={"epochs": 0.5}), tmp_path / "c", quiet=True)
    assert r.summary["steps"] == 6 and r.summary["epochs"] == pytest.approx(6 / 11)


def test_interrupt_then_resume_matches_uninterrupted(tiny, tmp_path, sgd):
    cfg = tiny(budget={"epochs": 3}, logging={"checkpoint_every_seconds": 0})
    ref = tmp_path / "ref"
    train_run(cfg, ref, quiet=True)

    run = tmp_path / "run"

    def stop_at_16(trainer):
        if trainer.state.step == 16:  # in the middle of epoch 2
            trainer.request_stop()

    r = train_run(cfg, run, quiet=True, on_step=(stop_at_16,))
    assert r.status == "interrupted" and "--resume" in r.message
    assert status(run)["status"] == "interrupted"
    r = train_run(cfg, run, resume=True, quiet=True)
    assert r.status == "finished"
    for k, v in params(ref).items():
        torch.testing.assert_close(params(run)[k], v, rtol=0, atol=0)
    assert losses(run) == losses(ref)
    assert losses(run, "steps.csv", ("loss", "loss_no_l2")) == losses(
        ref, "steps.csv", ("loss", "loss_no_l2"))


def test_ctrl_c_stops_cleanly_after_the_step(tiny, tmp_path, sgd):
    import os
    import signal

    def ctrl_c(trainer):
        if trainer.state.step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)   # default_int_handler, or SIG_IGN under nohup
    r = train_run(tiny(), run, quiet=True, on_step=(ctrl_c,))
    assert r.status == "interrupted" and r.summary["steps"] == 4
    assert load_checkpoint(run)["state"]["step"] == 4
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_crash_resumes_from_last_checkpoint_without_duplicate_logs(tiny, tmp_path, sgd):
    cfg = tiny(budget={"epochs": 3}, logging={"checkpoint_every_seconds": 0})
    ref = tmp_path / "ref"
    train_run(cfg, ref, quiet=True)

    def crash(trainer):
        if trainer.state.step == 27:  # a hard failure in epoch 3; last checkpoint: step 22
            raise RuntimeError("power cut")

    run = tmp_path / "run"
    with pytest.raises(RuntimeError):
        train_run(cfg, run, quiet=True, on_step=(crash,))
    assert status(run)["status"] == "failed"
    assert int(read_csv(run / "steps.csv")[-1]["step"]) == 26
    r = train_run(cfg, run, resume=True, quiet=True)
    assert r.status == "finished"
    steps = [int(x["step"]) for x in read_csv(run / "steps.csv")]
    assert steps == sorted(set(steps))  # rows after the checkpoint were dropped, not repeated
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()  # TensorBoard purges the events logged after the checkpoint (purge_step)
    tb_steps = [e.step for e in acc.Scalars("train/loss")]
    assert tb_steps == steps
    assert losses(run) == losses(ref)
    for k, v in params(ref).items():
        torch.testing.assert_close(params(run)[k], v, rtol=0, atol=0)


def test_resume_with_a_larger_budget_extends_the_run(tiny, tmp_path, sgd):
    ref = tmp_path / "ref"
    train_run(tiny(budget={"epochs": 3}), ref, quiet=True)
    run = tmp_path / "run"
    train_run(tiny(budget={"epochs": 1}), run, quiet=True)
    r = train_run(tiny(budget={"epochs": 3}), run, resume=True, quiet=True)
    assert r.summary["epochs"] == 3
    assert losses(run) == losses(ref)


def test_resume_refuses_a_different_experiment(tiny, tmp_path, sgd):
    run = tmp_path / "run"
    train_run(tiny(), run, quiet=True)
    with pytest.raises(ConfigError, match=r"cannot resume .*optimizer.lr: 0.05 -> 0.1"):
        train_run(tiny(optimizer={"lr": 0.1}), run, resume=True, quiet=True)


def test_divergence_stops_keeps_logs_and_is_marked(tiny, tmp_path, sgd):
    run = tmp_path / "run"
    r = train_run(tiny(optimizer={"lr": 1e12}, budget={"epochs": 5}), run, quiet=True)
    assert r.status == "diverged"
    assert "not finite" in r.message and "smaller lr" in r.message
    s = status(run)
    assert s["status"] == "diverged" and s["diverged"] is True and s["steps"] < 5 * 11
    assert (run / "steps.csv").exists() and (run / "epochs.csv").exists()


def test_warm_start_runs_once_and_not_on_resume(tiny, tmp_path, sgd):
    cfg = tiny(optimizer={"warm": True}, budget={"epochs": 1})
    run = tmp_path / "run"
    train_run(cfg, run, quiet=True)
    assert sgd[-1].warm_calls == 1
    train_run(tiny(optimizer={"warm": True}, budget={"epochs": 2}), run, resume=True, quiet=True)
    assert sgd[-1].warm_calls == 0


def test_kfqn_optimizer_resume_is_exact(tiny, tmp_path):
    """With the real K-BFGS optimizer (warm start, extra pass): interrupt + resume = straight."""
    cfg = tiny(budget={"epochs": 2}, logging={"checkpoint_every_seconds": 0})
    ref = tmp_path / "ref"
    train_run(cfg, ref, quiet=True)
    run = tmp_path / "run"

    def stop(trainer):
        if trainer.state.step == 7:
            trainer.request_stop()

    train_run(cfg, run, quiet=True, on_step=(stop,))
    train_run(cfg, run, resume=True, quiet=True)
    for k, v in params(ref).items():
        torch.testing.assert_close(params(run)[k], v)
    a = [float(x) for row in losses(run) for x in row[1:3]]
    b = [float(x) for row in losses(ref) for x in row[1:3]]
    assert a == pytest.approx(b, rel=1e-6)
