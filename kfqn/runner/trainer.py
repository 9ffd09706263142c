"""The training loop of one run: build, (resume,) train within a budget, evaluate, log, save.

Use :func:`train_run`; the CLI's ``kfqn train`` and every run of ``kfqn sweep`` go through it.

Timing follows the papers: the budget clocks (wall and process CPU time) count only the
optimizer's work (warm start and steps, data preparation included); evaluation, logging and
checkpointing are excluded.

Data-parallel runs (``kfqn train --nproc N``, torchrun, SLURM: :mod:`kfqn.runner.distributed`)
pass a :class:`~kfqn.runner.distributed.DistContext`: every rank draws the same global batches
and trains on its equal slice of each through ``DistributedDataParallel``; losses are averaged
and stop decisions taken together, the budget clocks are rank 0's; rank 0 alone evaluates (on
the whole evaluation set), logs and writes the run directory, and every rank reads the
checkpoint on resume.
"""
from __future__ import annotations

import math
import shutil
import signal
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from omegaconf import DictConfig

from kfqn.core.errors import ConfigError, KfqnError
from kfqn.runner import config as cfgmod
from kfqn.runner.checkpoint import (load_checkpoint, remove_stale_temporaries, rng_state,
                                    save_checkpoint, set_rng_state)
from kfqn.runner.components import get_component, resolve_options
from kfqn.runner.data.augment import make_augmentation
from kfqn.runner.distributed import SINGLE, DistContext, check_batch
from kfqn.runner.environment import configure_torch, derived_seeds, pick_device, seed_everything
from kfqn.runner.evaluation import evaluate, l2_coefficients, l2_term
from kfqn.runner.loader import BatchLoader
from kfqn.runner.logs import EPOCH_COLUMNS, STEP_COLUMNS, CsvLog, NullLog, TensorBoardLog
from kfqn.runner.memory import PeakMemory, state_megabytes
from kfqn.runner.errors import DataError, RunDirError
from kfqn.runner.preflight import preflight
from kfqn.runner.rundir import CONFIG, STATUS, is_run_dir, read_status, write_status


def build_optimizer(model: torch.nn.Module, spec: dict) -> torch.optim.Optimizer:
    """``kfqn.build_optimizer(model, spec)`` (imported late: the runner needs only this)."""
    import kfqn

    return kfqn.build_optimizer(model, spec)


@dataclass
class RunResult:
    """Outcome of a run: ``status`` is finished, diverged, interrupted or failed."""

    run_dir: Path
    status: str
    message: str
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class _State:
    """Counters and clocks saved in checkpoints."""

    step: int = 0
    epoch: int = 0  # completed epochs
    wall: float = 0.0  # training wall seconds (budget clock)
    cpu: float = 0.0  # training process CPU seconds (budget clock)
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    last_eval_step: int = -1
    best_train_loss: float = math.inf
    best_test_accuracy: Optional[float] = None
    last_eval: dict[str, Any] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: Optional[float] = None
    warm_started: bool = False


class Trainer:
    """One run. Construct, then call :meth:`run`.

    ``identity`` (task, method, preset, seed, grid) is stored in ``status.json`` and in the
    TensorBoard HParams entry. ``on_step`` callbacks are called after every step with the
    trainer (tests use them; :meth:`request_stop` ends the run cleanly after the current step,
    as Ctrl-C does). ``dist``: this rank of a data-parallel run (default: one process).
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, *, resume: bool = False,
                 overwrite: bool = False, quiet: bool = False, identity: Optional[dict] = None,
                 on_step: tuple[Callable[["Trainer"], None], ...] = (),
                 dist: Optional[DistContext] = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.overwrite = overwrite
        self.dist = dist or SINGLE
        self.main = self.dist.is_main  # rank 0 (or the only process): writes run_dir
        self._started = False  # True once this run writes into run_dir
        self.quiet = quiet or not cfg.logging.progress or not self.main
        self.identity = dict(identity or {})
        self.on_step = on_step
        self.state = _State()
        self._bad_batch: Optional[int] = None
        self._stop_requested = False
        self._checkpoint_due = False  # data-parallel: rank 0's timed-checkpoint decision
        self._warned: set[str] = set()

    # -- public --------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Stop after the current step, checkpoint and mark the run interrupted."""
        self._stop_requested = True

    def run(self) -> RunResult:
        """Train until the budget is spent, the loss diverges or a stop is requested."""
        try:
            return self._run()
        except KfqnError:
            raise
        except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of the current step
            if self._started and self.main:
                write_status(self.run_dir, {**self._previous_summary(), **self._status_base(),
                                            "status": "interrupted",
                                            "message": "aborted; --resume continues from the "
                                            "last checkpoint"})
            raise
        except Exception as exc:
            if self._started and self.main:  # before that, nothing on disk is this attempt's
                (self.run_dir / "error.txt").write_text(traceback.format_exc())
                msg = f"{type(exc).__name__}: {exc}".splitlines()[0]
                if self.dist.active:
                    msg = f"rank {self.dist.rank} of {self.dist.world_size}: {msg}"
                write_status(self.run_dir, {**self._previous_summary(), **self._status_base(),
                                            "status": "failed", "message": msg,
                                            "error_file": str(self.run_dir / "error.txt")})
            raise

    def _previous_summary(self) -> dict[str, Any]:
        """The summary of the run's last recorded end (kept when a later attempt fails)."""
        prev = getattr(self, "_previous", None) or {}
        if prev.get("status") in ("finished", "diverged", "interrupted"):
            return {"previous_status": prev.get("status"), **{
                k: v for k, v in prev.items() if k not in ("status", "message", "updated")}}
        return {}

    # -- set-up --------------------------------------------------------------------------------
    def _setup(self) -> Optional[dict]:
        """Build everything; touches nothing on disk (apart from a data set's own cache)."""
        cfg = self.cfg
        preflight(cfg)
        configure_torch(cfg.threads, cfg.deterministic)
        self.device = self.dist.device if self.dist.active else pick_device(cfg.device)
        check_batch(cfg.data.batch_size, self.dist.world_size)
        seed_everything(cfg.seed)
        order_seed, aug_seed = derived_seeds(cfg.seed, 2)

        self.data_comp = get_component("dataset", cfg.data.name, "data.name")
        data_opts = resolve_options(self.data_comp, cfgmod.to_dict(cfg.data.options),
                                    "data.options")
        splits = self.data_comp.load(Path(cfg.data.root).expanduser(), cfg.data.seed,
                                     download=cfg.data.download, **data_opts)
        _check_finite(splits, cfg.data.name)
        n_train = len(splits.train)
        if cfg.data.batch_size > n_train:
            raise ConfigError(f"data.batch_size = {cfg.data.batch_size} is larger than the "
                              f"training set of {cfg.data.name!r} ({n_train} samples); give "
                              f"data.batch_size <= {n_train} (= {n_train} is full batch)")
        check_batch(cfg.data.batch_size, self.dist.world_size, n_train, cfg.data.drop_last)
        self.splits = splits.to(self.device)

        self.model_comp = get_component("model", cfg.model.name, "model.name")
        self.model_opts = resolve_options(self.model_comp, cfgmod.to_dict(cfg.model.options),
                                          "model.options")
        self.model = self.model_comp.build(splits.input_shape, splits.num_classes,
                                           **self.model_opts).to(self.device)
        self.opt_spec = cfgmod.to_dict(cfg.optimizer)
        # the model the steps call: DistributedDataParallel with N ranks (it averages the
        # gradients; the kfqn optimizer averages its statistics over its process group);
        # self.model (evaluation, checkpoints, the L2 term) is the plain module
        self.net = self.dist.wrap(self.model)
        self.optimizer = build_optimizer(self.net, self.opt_spec)
        self.scheduler = _make_scheduler(self.optimizer, cfg)
        self.taus = l2_coefficients(self.optimizer, self.opt_spec, cfg.eval.weight_decay)

        self.loader = BatchLoader(self.splits.train, cfg.data.batch_size, shuffle=True,
                                  drop_last=cfg.data.drop_last, seed=order_seed)
        self.augment = make_augmentation(cfg.data.augment, self.data_comp.augmentation, aug_seed)
        return load_checkpoint(self.run_dir, map_location=self.device) if self.resume else None

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scheduler is not None and ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        self.loader.load_state_dict(ckpt["loader"])
        if self.augment is not None and ckpt.get("augment") is not None:
            self.augment.load_state_dict(ckpt["augment"])
        set_rng_state(ckpt["rng"])
        self.state = _State(**ckpt["state"])

    def _checkpoint(self) -> None:
        # every rank takes part (under placement=owner each layer's factors come from their
        # owner: a collective); rank 0 writes the whole state
        optimizer_state = self.optimizer.state_dict()
        if not self.main:
            return
        save_checkpoint(self.run_dir, {
            "model": self.model.state_dict(),
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "loader": self.loader.state_dict(),
            "augment": self.augment.state_dict() if self.augment is not None else None,
            "rng": rng_state(),
            "state": dict(self.state.__dict__),
        })
        self._last_ckpt_wall = time.perf_counter()

    def _check_resume_config(self) -> None:
        saved = self.run_dir / CONFIG
        if not saved.exists():
            return
        old = cfgmod.to_dict(cfgmod.load_file(saved))
        new = cfgmod.to_dict(self.cfg)
        # where factor work runs (like the number of ranks) may change: the checkpoint holds
        # every layer whatever the placement that wrote it
        diff = [d for d in cfgmod.config_diff(old, new)
                if d.split(".")[0].split(":")[0] not in cfgmod.RESUMABLE_SECTIONS
                and not d.startswith("optimizer.placement")]
        if diff:
            raise ConfigError(
                f"cannot resume {self.run_dir}: its config differs in {'; '.join(diff[:3])}"
                f"{' ...' if len(diff) > 3 else ''}. Only budget, logging, eval, report and "
                "optimizer.placement may change on resume; start a new run (another "
                "logging.run_dir) instead."
            )

    # -- the run -------------------------------------------------------------------------------
    def _status_base(self) -> dict[str, Any]:
        base = {**self.identity, "run_dir": str(self.run_dir),
                "data": self.cfg.data.name, "model": self.cfg.model.name,
                "preset": self.cfg.optimizer.get("preset")}
        if self.dist.active:
            base["world_size"] = self.dist.world_size
        return base

    def _prepare_dir(self) -> None:
        """Create the run directory; with ``overwrite``, first delete the run it holds (only
        now, after the new run has been built: a bad config never costs the old run)."""
        d = self.run_dir
        if self.overwrite and d.exists():
            if is_run_dir(d):
                shutil.rmtree(d)
            elif any(d.iterdir()):
                raise RunDirError(f"{d} is not empty and holds no run (no {STATUS}); refusing "
                                  "to delete it with --overwrite: choose another directory")
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create the run directory {d}: {exc.strerror or exc} "
                              "(check logging.root / logging.run_dir)") from None
        remove_stale_temporaries(d)

    def _run(self) -> RunResult:
        preflight(self.cfg)  # also sets derived keys, so that a resumed config compares equal
        if self.resume:
            self._check_resume_config()
        self._previous = read_status(self.run_dir)
        ckpt = self._setup()
        if self.overwrite:
            ckpt = None
        self.dist.barrier()  # every rank has read the checkpoint before rank 0 writes
        if self.main:
            self._prepare_dir()
        self._started = True
        resumed = ckpt is not None
        if resumed:
            self._restore(ckpt)
        elif self.main:  # a fresh start: event files of an earlier attempt would mix into plots
            for old in self.run_dir.glob("events.out.tfevents.*"):
                old.unlink()
        self._first_step = self.state.step
        self.task_type = self.model_comp.task
        start_step = self.state.step if resumed else None
        if self.main:
            cfgmod.save(self.cfg, self.run_dir / CONFIG)
            self.steps_log = CsvLog(self.run_dir / "steps.csv", STEP_COLUMNS, start_step)
            self.epochs_log = CsvLog(self.run_dir / "epochs.csv", EPOCH_COLUMNS, start_step)
        else:  # the other ranks of a data-parallel run write nothing
            self.steps_log = self.epochs_log = NullLog()
        self.tb = TensorBoardLog(self.run_dir, self.cfg.logging.tensorboard and self.main,
                                 purge_step=(start_step + 1) if resumed else None)
        self.memory = PeakMemory(self.device)
        self.memory.start()
        self._memory_start_mb = self.memory.start_mb
        self._last_ckpt_wall = time.perf_counter()
        self._write_status({**self._status_base(), "status": "running",
                            "message": "resumed" if resumed else "started"})
        try:
            with _sigint_guard(self):
                status, message = self._loop()
        finally:
            self.tb.flush()
        summary = self._summary(status)
        self._write_status({**self._status_base(), **summary, "status": status,
                            "message": message})
        if status in ("finished", "diverged") and self.state.step > self._first_step:
            self._write_hparams(summary)
        self.tb.close()
        return RunResult(self.run_dir, status, message, summary)

    def _write_status(self, data: dict[str, Any]) -> None:
        if self.main:
            write_status(self.run_dir, data)

    def _max_steps(self) -> float:
        b = self.cfg.budget
        limits = [math.inf]
        if b.steps is not None:
            limits.append(b.steps)
        if b.epochs is not None:
            limits.append(math.ceil(b.epochs * len(self.loader) - 1e-9))
        return min(limits)

    def _budget_spent(self) -> Optional[str]:
        b, s = self.cfg.budget, self.state
        if s.step >= self._max_steps():
            return "steps" if b.steps is not None and s.step >= b.steps else "epochs"
        if b.seconds is not None and s.wall >= b.seconds:
            return "seconds"
        if b.cpu_seconds is not None and s.cpu >= b.cpu_seconds:
            return "cpu_seconds"
        return None

    def _timed_checkpoint_due(self) -> bool:
        every_s = self.cfg.logging.checkpoint_every_seconds
        return bool(every_s) and time.perf_counter() - self._last_ckpt_wall >= every_s

    def _should_stop(self) -> Optional[str]:
        if self.dist.active:  # one decision for all ranks, from rank 0's budget clocks
            s = self.state
            stop, s.wall, s.cpu, self._checkpoint_due = self.dist.agree(
                self._stop_requested, s.wall, s.cpu, self._timed_checkpoint_due())
            self._stop_requested = self._stop_requested or stop
        return self._budget_spent() or ("interrupted" if self._stop_requested else None)

    def _warm_start(self) -> None:
        if self.state.warm_started or not getattr(self.optimizer, "needs_warm_start", False):
            return
        w0, c0 = time.perf_counter(), time.process_time()
        buffers = {k: v.clone() for k, v in self.model.named_buffers()}
        # N ranks: each batch split into equal shards (the statistics are averaged over the
        # ranks, so this is the one-rank warm start); when the training set does not split into
        # N equal parts, every rank passes over all of it (also exact, not faster)
        split = self.dist.active and len(self.splits.train) % self.dist.world_size == 0
        with self.optimizer.warm_start(), torch.no_grad():
            for xb, _ in _plain_batches(self.splits.train.tensors, self.cfg.data.batch_size):
                if split:
                    (xb,) = self.dist.shard(xb)
                self.model(self.splits.prepare(xb))
        with torch.no_grad():  # the pass must not move BatchNorm running statistics
            for k, v in self.model.named_buffers():
                v.copy_(buffers[k])
        self.state.wall += time.perf_counter() - w0
        self.state.cpu += time.process_time() - c0
        self.state.warm_started = True

    def _loop(self) -> tuple[str, str]:
        cfg, s = self.cfg, self.state
        spe = len(self.loader)
        if spe == 0:
            raise ConfigError(f"data.batch_size = {cfg.data.batch_size} is larger than the "
                              f"training set ({self.loader.n} samples) with data.drop_last=true")
        if cfg.eval.at_start and s.step == 0 and s.last_eval_step < 0:
            self._evaluate_and_log()  # the starting point of every curve: epoch 0, time 0
        self._warm_start()
        total = self._max_steps()
        bar = _Progress(self, total, self.quiet, self.identity.get("label") or str(self.run_dir))
        stop, status, message = self._should_stop(), "finished", ""
        try:
            while stop is None:
                for xb, yb in self.loader:
                    loss = self._train_step(xb, yb)
                    bar.advance()
                    if not math.isfinite(loss):
                        if xb.is_floating_point() and not bool(torch.isfinite(xb).all()):
                            self._bad_batch = self.loader.position - 1
                        stop = "diverged"
                        break
                    if s.step % cfg.logging.every_steps == 0:
                        bar.set_postfix(loss=f"{loss:.4g}", epoch=f"{self._epochs():.2f}")
                    for cb in self.on_step:
                        cb(self)
                    stop = self._should_stop()
                    if stop and self.loader.position < len(self.loader):
                        break  # mid-epoch; on the epoch's last batch, finish the epoch first
                    # rank 0's clock decides for every rank (_should_stop agreed on it)
                    due = (self._checkpoint_due if self.dist.active
                           else self._timed_checkpoint_due())
                    if due and not stop:
                        self._checkpoint()
                else:
                    s.epoch += 1
                    self._end_of_epoch()
                    stop = stop or self._should_stop()
        finally:
            bar.close()
        if stop == "diverged":
            status = "diverged"
            message = (f"diverged at step {s.step} (epoch {self._epochs():.2f}): the training loss "
                       "is not finite. Logs are kept; the last good checkpoint is not "
                       "overwritten. Try a smaller lr or a larger damping.")
            if self._bad_batch is not None:
                status = "failed"
                message = (f"the training data is not finite: batch {self._bad_batch} "
                           f"(step {s.step}, epoch {self._epochs():.2f}) holds NaN or inf "
                           "inputs; check the data set")
        elif stop == "interrupted":
            status = "interrupted"
            self._checkpoint()
            message = (f"interrupted at step {s.step}; checkpoint saved. Continue with: "
                       f"kfqn train {self.run_dir} --resume")
        else:
            if s.last_eval_step != s.step:
                self._evaluate_and_log()
            self._checkpoint()
            message = f"budget reached ({stop}) after {s.step} steps, {self._epochs():.2f} epochs"
        return status, message

    def _train_step(self, xb: torch.Tensor, yb: torch.Tensor) -> float:
        cfg, s = self.cfg, self.state
        log_now = (s.step + 1) % cfg.logging.every_steps == 0
        l2 = l2_term(self.optimizer, self.taus) if log_now else None  # at theta_k, off the clock
        w0, c0 = time.perf_counter(), time.process_time()
        if self.augment is None:
            xb, yb = self.dist.shard(xb, yb)  # this rank's rows of the global batch
            x = self.splits.scaled(xb)
        else:  # augmented as a whole (one random stream, as with one rank), then sharded
            x = self.augment(self.splits.scaled(xb))  # outside the closure: both closure
            x, yb = self.dist.shard(x, yb)            # calls see one sample
        x = self.splits.normalize(x)
        model, comp, opts, opt = self.net, self.model_comp, self.model_opts, self.optimizer

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = comp.loss(model(x), x, yb, **opts)
            loss.backward()
            return loss

        loss_t = opt.step(closure)
        if isinstance(loss_t, torch.Tensor):
            loss_t = loss_t.detach()
        loss = float(loss_t) if loss_t is not None else math.nan
        loss = self.dist.mean_loss(loss)  # the global batch's loss on every rank
        if self.scheduler is not None and cfg.schedule.interval == "step":
            self.scheduler.step()
        dw, dc = time.perf_counter() - w0, time.process_time() - c0
        s.wall += dw
        s.cpu += dc
        s.step += 1
        phases = getattr(opt, "last_phase_times", None) or {}
        for k, v in phases.items():
            s.phase_seconds[k] = s.phase_seconds.get(k, 0.0) + float(v)
        if math.isfinite(loss):
            s.epoch_loss_sum += loss
            s.epoch_loss_count += 1
        if log_now:
            self._log_step(loss, l2, dw, phases)
        if s.step % cfg.logging.stats_every_steps == 0:
            self._log_stats()
        return loss

    def _epochs(self) -> float:
        return self.state.epoch + self.loader.position / max(1, len(self.loader))

    def _lr(self) -> Optional[float]:
        groups = self.optimizer.param_groups
        return float(groups[0]["lr"]) if groups and "lr" in groups[0] else None

    def _log_step(self, loss: float, l2: float, step_seconds: float, phases: dict) -> None:
        s = self.state
        row = {"step": s.step, "epoch": self._epochs(), "loss": loss + l2, "loss_no_l2": loss,
               "lr": self._lr(), "step_seconds": step_seconds, "wall_seconds": s.wall,
               "cpu_seconds": s.cpu}
        self.steps_log.append(row)
        scalars = {"train/loss": loss + l2, "train/loss_no_l2": loss, "train/lr": row["lr"],
                   "time/step_seconds": step_seconds, "time/cpu_seconds": s.cpu,
                   "time/wall_seconds": s.wall}
        scalars.update({f"time/phase/{k}": v for k, v in phases.items()})
        self.tb.scalars(scalars, s.step)

    def _log_stats(self) -> None:
        fn = getattr(self.optimizer, "stats", None)
        if not callable(fn) or "stats" in self._warned or not self.main:
            return
        try:
            stats = fn() or {}
            flat = {f"stats/{layer}/{k}": float(v) for layer, d in stats.items()
                    for k, v in (d or {}).items()
                    if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)}
        except Exception as exc:  # a broken stats() must not end the run
            self._warned.add("stats")
            _print(f"warning: optimizer.stats() failed ({exc!r}); not logging stats")
            return
        self.tb.scalars(flat, self.state.step)

    def _end_of_epoch(self) -> None:
        cfg, s = self.cfg, self.state
        if self.scheduler is not None and cfg.schedule.interval == "epoch":
            self.scheduler.step()
        due = s.epoch % cfg.eval.every_epochs == 0
        if due:
            self._evaluate_and_log()
        every = cfg.logging.checkpoint_every_epochs
        if every and s.epoch % every == 0 and self._budget_spent() is None:
            self._checkpoint()

    def _evaluate_and_log(self) -> None:
        cfg, s = self.cfg, self.state
        if not self.main:  # rank 0 evaluates the whole sets; the others keep the bookkeeping
            s.last_eval_step = s.step
            s.epoch_loss_sum, s.epoch_loss_count = 0.0, 0
            return
        l2 = l2_term(self.optimizer, self.taus)
        batch_mean = (s.epoch_loss_sum / s.epoch_loss_count) if s.epoch_loss_count else None
        if cfg.eval.train_loss:
            train_no_l2, _ = evaluate(self.model, self.model_comp, self.model_opts, self.splits,
                                      self.splits.train, cfg.data.eval_batch_size,
                                      cfg.eval.max_train_samples)
        else:
            train_no_l2 = batch_mean if batch_mean is not None else math.nan
        test_loss, test_acc = evaluate(self.model, self.model_comp, self.model_opts,
                                       self.splits, self.splits.test, cfg.data.eval_batch_size)
        train = train_no_l2 + l2
        row = {"epoch": self._epochs(), "step": s.step, "train_loss": train,
               "train_loss_no_l2": train_no_l2, "batch_loss_mean": batch_mean,
               "test_loss": test_loss, "test_accuracy": test_acc, "lr": self._lr(),
               "wall_seconds": s.wall, "cpu_seconds": s.cpu,
               "steps_per_second": s.step / s.wall if s.wall > 0 else None}
        self.epochs_log.append(row)
        self.tb.scalars({"epoch/train_loss": train, "epoch/train_loss_no_l2": train_no_l2,
                         "epoch/batch_loss_mean": batch_mean, "epoch/epoch": row["epoch"],
                         "test/loss": test_loss, "test/accuracy": test_acc}, s.step)
        if math.isfinite(train):
            s.best_train_loss = min(s.best_train_loss, train)
        if test_acc is not None:
            s.best_test_accuracy = max(test_acc, s.best_test_accuracy or 0.0)
        s.last_eval = {k: row[k] for k in ("epoch", "train_loss", "train_loss_no_l2",
                                           "test_loss", "test_accuracy")}
        s.last_eval_step = s.step
        s.epoch_loss_sum, s.epoch_loss_count = 0.0, 0
        peak = self.memory.peak()["peak_memory_mb"]
        if peak is not None:
            s.peak_memory_mb = max(peak, s.peak_memory_mb or 0.0)
        self.tb.flush()

    # -- summary -------------------------------------------------------------------------------
    def _summary(self, status: str) -> dict[str, Any]:
        s = self.state
        mem = self.memory.peak()
        peak = max(filter(None, [mem["peak_memory_mb"], s.peak_memory_mb]), default=None)
        ev = s.last_eval
        return {
            "task_type": self.task_type,
            "steps": s.step, "epochs": self._epochs(),
            "final_train_loss": ev.get("train_loss"),
            "final_train_loss_no_l2": ev.get("train_loss_no_l2"),
            "best_train_loss": s.best_train_loss if math.isfinite(s.best_train_loss) else None,
            "final_test_loss": ev.get("test_loss"),
            "final_test_accuracy": ev.get("test_accuracy"),
            "best_test_accuracy": s.best_test_accuracy,
            "wall_seconds": s.wall, "cpu_seconds": s.cpu,
            "steps_per_second": s.step / s.wall if s.wall > 0 else None,
            "phase_seconds": s.phase_seconds,
            "peak_memory_mb": peak, "memory_start_mb": self._memory_start_mb,
            "memory_method": mem["memory_method"],
            "optimizer_state_mb": self._optimizer_state_mb(),
            "num_params": sum(p.numel() for p in self.model.parameters()),
            "l2_tau": self.taus[0] if len(set(self.taus)) == 1 else self.taus,
            "diverged": status == "diverged",
        }

    def _optimizer_state_mb(self) -> float:
        """Megabytes of optimizer state: its ``state_bytes()`` or its state dict's tensors."""
        fn = getattr(self.optimizer, "state_bytes", None)
        if callable(fn):
            try:
                return float(fn()) / 2**20
            except Exception:  # fall back to counting the state dict
                pass
        return state_megabytes(self.optimizer.state_dict())

    def _write_hparams(self, summary: dict) -> None:
        hp: dict[str, Any] = {k: v for k, v in self.identity.items()
                              if k in ("task", "method", "preset", "seed")}
        for k, v in _flatten(self.opt_spec).items():
            hp[f"optimizer.{k}"] = v
        hp.update({k: v for k, v in self.identity.get("grid", {}).items()})
        metrics = {"hparams/final_train_loss": summary["final_train_loss"],
                   "hparams/best_train_loss": summary["best_train_loss"],
                   "hparams/epochs": summary["epochs"],
                   "hparams/cpu_seconds": summary["cpu_seconds"]}
        if summary["task_type"] == "classification":
            metrics["hparams/test_accuracy"] = summary["final_test_accuracy"]
        else:
            metrics["hparams/test_loss"] = summary["final_test_loss"]
        self.tb.hparams(hp, metrics)


def train_run(cfg: DictConfig, run_dir: Path, *, resume: bool = False, overwrite: bool = False,
              quiet: bool = False, identity: Optional[dict] = None,
              on_step: tuple[Callable[[Trainer], None], ...] = (),
              dist: Optional[DistContext] = None) -> RunResult:
    """Run (or, with ``resume``, continue) one experiment in ``run_dir``; ``overwrite``
    replaces the run in ``run_dir`` once the new one has been built. ``dist``: this rank of a
    data-parallel run (:func:`kfqn.runner.distributed.init`)."""
    return Trainer(cfg, run_dir, resume=resume, overwrite=overwrite, quiet=quiet,
                   identity=identity, on_step=on_step, dist=dist).run()


def _check_finite(splits: Any, name: str) -> None:
    """A :class:`DataError` naming the split and the first sample with NaN or inf inputs."""
    for split, ds in (("training", splits.train), ("test", splits.test)):
        x = ds.tensors[0]
        if not x.is_floating_point():
            continue
        bad = ~torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise DataError(f"data set {name!r}: the {split} inputs are not finite ("
                            f"{int(bad.sum())} of {len(x)} samples hold NaN or inf, the first "
                            f"at index {first}); fix or regenerate the data files")


# -- helpers ---------------------------------------------------------------------------------------
def _make_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig):
    sched = cfg.get("schedule")
    if sched is None or not sched.name:
        return None
    cls = getattr(torch.optim.lr_scheduler, sched.name, None)
    if not isinstance(cls, type):
        names = [n for n in dir(torch.optim.lr_scheduler) if n.endswith("LR")]
        raise ConfigError(f"schedule.name = {sched.name!r} is not a scheduler of "
                          f"torch.optim.lr_scheduler; e.g. {', '.join(sorted(names)[:8])}")
    try:
        return cls(optimizer, **cfgmod.to_dict(sched.options))
    except TypeError as exc:
        raise ConfigError(f"schedule.options for {sched.name}: {exc}") from None


def _plain_batches(tensors, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
    n = len(tensors[0])
    for start in range(0, n, batch_size):
        yield tuple(t[start:start + batch_size] for t in tensors)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, (bool, int, float, str)):
            out[f"{prefix}{k}"] = v
    return out


def _print(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg)


class _Progress:
    """tqdm bar in the unit of the binding budget: steps, or (CPU) seconds for time budgets."""

    def __init__(self, trainer: Trainer, max_steps: float, quiet: bool, desc: str) -> None:
        self.trainer, self.bar = trainer, None
        b, s = trainer.cfg.budget, trainer.state
        if math.isfinite(max_steps):
            self.unit, total, done = "step", int(max_steps), s.step
        elif b.cpu_seconds is not None:
            self.unit, total, done = "CPU s", b.cpu_seconds, s.cpu
        else:
            self.unit, total, done = "s", b.seconds, s.wall
        self.last = done
        if not quiet:
            from tqdm import tqdm

            fmt = None if self.unit == "step" else (
                "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f} " + self.unit
                + " [{elapsed}<{remaining}{postfix}]")
            self.bar = tqdm(total=total, initial=done, desc=desc, unit=self.unit,
                            dynamic_ncols=True, leave=False, bar_format=fmt)

    def advance(self) -> None:
        if self.bar is None:
            return
        s = self.trainer.state
        now = {"step": s.step, "CPU s": s.cpu, "s": s.wall}[self.unit]
        self.bar.update(min(now, self.bar.total) - self.last)
        self.last = min(now, self.bar.total)

    def set_postfix(self, **kw: Any) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**kw)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def _sigint_guard(trainer: Trainer) -> Iterator[None]:
    """First Ctrl-C: stop after the current step and checkpoint; second: abort at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    received: list[int] = []

    def handler(signum, frame):
        # with N ranks, a stop may have been agreed on another rank's Ctrl-C before this
        # rank's own arrives: only this rank's second Ctrl-C aborts it
        if trainer._stop_requested and (received or not trainer.dist.active):
            raise KeyboardInterrupt
        received.append(signum)
        if trainer.main:
            _print("interrupt: stopping after this step and saving a checkpoint "
                   "(Ctrl-C again to abort without saving)")
        trainer.request_stop()

    try:
        old = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not allowed here (embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


__all__ = ["RunResult", "Trainer", "train_run"]
