"""Data-parallel runs of ``kfqn train``: N processes (ranks), one global batch.

Three ways to start one, all ending in the same code:

* ``kfqn train CONFIG --nproc N`` -- :func:`launch` starts N local ranks through
  ``torch.distributed``'s elastic launcher (what ``torchrun --standalone`` runs) and reports a
  failed rank in one line;
* ``torchrun --nproc-per-node N -m kfqn train CONFIG`` (or any launcher that sets ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``);
* ``srun -n N kfqn train CONFIG`` under SLURM (``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``,
  ``SLURM_LOCALID``; the first host of the step's node list is the master unless
  ``MASTER_ADDR`` is set, the port ``MASTER_PORT`` or one derived from the job id).

:func:`detect` reads the environment, :func:`init` starts the process group (gloo on CPU, nccl
on CUDA, one GPU per local rank) with a timeout (``$KFQN_DIST_TIMEOUT`` seconds, default 1800):
a rank that stops answering ends the others with an error instead of a hang.

How a run with N ranks equals the run with one (the trainer does this with a
:class:`DistContext`): ``data.batch_size`` stays the global batch B (divisible by N); every
rank draws the same global batches in the same seeded order and takes its rows
``[r*B/N, (r+1)*B/N)`` of each; the model is wrapped in ``DistributedDataParallel`` and the
kfqn optimizer averages every layer statistic over the ranks; the loss is averaged, and stop
decisions (budget, Ctrl-C, divergence) are taken together. Rank 0 alone evaluates, logs and
writes the run directory; every rank reads the checkpoint when a run resumes.
"""
from __future__ import annotations

import math
import os
import re
import signal
import sys
import tempfile
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

import torch

from kfqn.core.errors import ConfigError, KfqnError

#: seconds a collective may wait for the other ranks before the run fails
ENV_TIMEOUT = "KFQN_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0
#: set for the ranks of ``kfqn train --nproc``: the launching command reports their errors
ENV_LAUNCHED = "KFQN_LAUNCHED_RANKS"

T = TypeVar("T")


# -- the environment -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Environment:
    """Where this process stands: ``launcher`` is ``torchrun``, ``slurm`` or ``none``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    launcher: str = "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], key: str, low: int = 0) -> int:
    raw = env.get(key, "")
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"${key} = {raw!r} is not an integer (set by the launcher: torchrun, "
                          "srun or kfqn train --nproc)") from None
    if value < low:
        raise ConfigError(f"${key} = {value} must be >= {low}")
    return value


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``."""
    m = re.match(r"\s*([^,\[]+)(?:\[([^\]]*)\])?", nodelist or "")
    if not m or not m.group(1).strip():
        raise ConfigError(f"cannot read the first host of the SLURM node list {nodelist!r}; "
                          "set MASTER_ADDR")
    prefix, ranges = m.group(1).strip(), m.group(2)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0].strip()


def detect(env: Optional[Mapping[str, str]] = None) -> Environment:
    """This process's rank and world from ``env`` (default ``os.environ``).

    ``RANK`` and ``WORLD_SIZE`` (torchrun, ``kfqn train --nproc``) win over SLURM; SLURM counts
    only inside an ``srun`` step (``SLURM_STEP_NUM_TASKS``): a batch script's own shell, which
    also sees ``SLURM_NTASKS``, is one process.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        world = _int(env, "WORLD_SIZE", 1)
        rank = _int(env, "RANK")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        port = _int(env, "MASTER_PORT", 1) if env.get("MASTER_PORT") else None
        where = Environment(rank, world, local, env.get("MASTER_ADDR") or None, port, "torchrun")
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS", 1)
        rank = _int(env, "SLURM_PROCID")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        addr = env.get("MASTER_ADDR") or None
        if addr is None and world > 1:
            addr = first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                              or env.get("SLURM_NODELIST") or "")
        if env.get("MASTER_PORT"):
            port: Optional[int] = _int(env, "MASTER_PORT", 1)
        else:
            job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
            port = 15000 + (int(job) % 20000 if job.isdigit() else 0)
        where = Environment(rank, world, local, addr, port, "slurm")
    else:
        return Environment()
    if where.rank >= where.world_size:
        raise ConfigError(f"rank {where.rank} is not below the world size {where.world_size} "
                          f"(launcher: {where.launcher})")
    return where


def timeout_seconds(env: Optional[Mapping[str, str]] = None) -> float:
    """``$KFQN_DIST_TIMEOUT`` (seconds), default 1800."""
    env = os.environ if env is None else env
    raw = env.get(ENV_TIMEOUT, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise ConfigError(f"${ENV_TIMEOUT} = {raw!r} must be a positive number of seconds")
    return value


def check_batch(batch_size: int, world_size: int, n_train: Optional[int] = None,
                drop_last: bool = True) -> None:
    """A :class:`ConfigError` unless every training batch splits into equal shards."""
    if world_size <= 1:
        return
    if batch_size % world_size:
        lo = batch_size - batch_size % world_size
        hint = f"{lo} or {lo + world_size}" if lo else str(world_size)
        raise ConfigError(f"data.batch_size = {batch_size} (the global batch) is not divisible "
                          f"by the {world_size} ranks; use a multiple of {world_size} (e.g. "
                          f"{hint}) or another number of ranks")
    if n_train is not None and not drop_last and n_train > batch_size:
        rest = n_train % batch_size
        if rest % world_size:
            raise ConfigError(f"data.drop_last=false: the last batch of each epoch holds {rest} "
                              f"of the {n_train} training samples, which {world_size} ranks "
                              "cannot split equally; set data.drop_last=true or another "
                              "batch size")


# -- a running group -----------------------------------------------------------------------------
class DistContext:
    """This rank's view of the process group (``world_size`` 1: a plain single process, and
    every method is free)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: Optional[torch.device] = None, backend: Optional[str] = None,
                 launcher: str = "none") -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = device
        self.backend = backend
        self.launcher = launcher

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that evaluates, logs and writes the run directory."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def rows(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n`` (``n`` divisible by the world size)."""
        if not self.active:
            return slice(0, n)
        if n % self.world_size:
            raise ConfigError(f"a batch of {n} samples does not split into {self.world_size} "
                              "equal shards")
        k = n // self.world_size
        return slice(self.rank * k, (self.rank + 1) * k)

    def shard(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each tensor's rows of this rank (equal slices of the global batch)."""
        if not self.active:
            return tensors
        rows = self.rows(len(tensors[0]))
        return tuple(t[rows] for t in tensors)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in ``DistributedDataParallel`` (itself on one rank)."""
        if not self.active:
            return model
        ids = [self.device] if self.device is not None and self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def _tensor(self, values: Sequence[float]) -> torch.Tensor:
        dev = self.device if self.backend == "nccl" else torch.device("cpu")
        return torch.tensor(list(values), dtype=torch.float64, device=dev)

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed over the ranks (one all-reduce)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = self._tensor(values)
        dist.all_reduce(t)
        return [float(v) for v in t.cpu()]

    def mean_loss(self, loss: float) -> float:
        """The global batch's loss: the mean of the ranks' (equal-shard) losses; NaN anywhere
        is NaN everywhere."""
        if not self.active:
            return loss
        return self.sum([loss])[0] / self.world_size

    def agree(self, stop: bool, wall: float, cpu: float,
              checkpoint_due: bool = False) -> tuple[bool, float, float, bool]:
        """(any rank asks to stop, rank 0's wall clock, rank 0's CPU clock, rank 0's "a timed
        checkpoint is due"): every rank takes the same stop and checkpoint decisions from the
        same clocks (a checkpoint is a collective under placement=owner)."""
        if not self.active:
            return stop, wall, cpu, checkpoint_due
        main = 1.0 if self.is_main else 0.0
        s, w, c, d = self.sum([float(stop), main * wall, main * cpu,
                               main * float(checkpoint_due)])
        return s > 0, w, c, d > 0

    def barrier(self) -> None:
        if self.active:
            self.sum([0.0])

    def on_main(self, fn: Callable[[], T]) -> Optional[T]:
        """Run ``fn`` on rank 0; a :class:`KfqnError` it raises is raised on every rank (same
        class, same message), so that all ranks end together with rank 0's message."""
        if not self.active:
            return fn()
        import torch.distributed as dist

        result: Optional[T] = None
        box: list[Any] = [None]
        if self.is_main:
            try:
                result = fn()
            except KfqnError as exc:
                box[0] = (type(exc), str(exc))
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            cls, msg = box[0]
            raise (cls if isinstance(cls, type) and issubclass(cls, KfqnError) else KfqnError)(msg)
        return result

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = DistContext()


def init(where: Environment, device: torch.device,
         timeout: Optional[float] = None) -> DistContext:
    """Join the process group of ``where`` (gloo for CPU, nccl for CUDA: GPU ``LOCAL_RANK``)."""
    if not where.distributed:
        return DistContext(device=device)
    import torch.distributed as dist

    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; run one process")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if where.local_rank >= count:
            raise ConfigError(f"local rank {where.local_rank} has no GPU ({count} visible): "
                              "start at most one rank per GPU on each node")
        device = torch.device("cuda", where.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"data-parallel training runs on cpu or cuda, not {device.type}")
    os.environ.setdefault("RANK", str(where.rank))
    os.environ.setdefault("WORLD_SIZE", str(where.world_size))
    os.environ.setdefault("LOCAL_RANK", str(where.local_rank))
    if where.master_addr:
        os.environ.setdefault("MASTER_ADDR", where.master_addr)
    if where.master_port:
        os.environ.setdefault("MASTER_PORT", str(where.master_port))
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} not set: the launcher must say where rank 0 "
                          "listens (torchrun and kfqn train --nproc do)")
    seconds = timeout_seconds() if timeout is None else timeout
    dist.init_process_group(backend, init_method="env://", rank=where.rank,
                            world_size=where.world_size, timeout=timedelta(seconds=seconds))
    return DistContext(where.rank, where.world_size, where.local_rank, device, backend,
                       where.launcher)


def launched_by_kfqn() -> bool:
    """Whether ``kfqn train --nproc`` started this rank (it then reports errors itself)."""
    return os.environ.get(ENV_LAUNCHED) == "1"


def record_error(exc: BaseException) -> None:
    """Write ``exc`` where the elastic launcher looks for a failed rank's error (when set)."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)
    except Exception:  # reporting must never hide the error itself
        pass


# -- kfqn train --nproc N ------------------------------------------------------------------------
@dataclass
class LaunchResult:
    """``exit_code`` of the launch; ``failed_rank``, ``error`` (one line), ``worker_exit`` and
    ``traceback``: the rank that failed first."""

    exit_code: int
    failed_rank: Optional[int] = None
    error: str = ""
    worker_exit: Optional[int] = None
    traceback: str = ""


def launch(nproc: int, argv: Sequence[str], threads: Optional[int] = None) -> LaunchResult:
    """Run ``python -m kfqn ARGV`` as ``nproc`` local ranks (the elastic launcher behind
    ``torchrun --standalone``) and wait for them.

    The ranks run in sessions of their own: Ctrl-C reaches this process, which passes it on to
    every rank (each stops after its step, rank 0 checkpoints) and waits for them
    ``$TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (30) before it kills them; a second Ctrl-C
    ends them at once. When a rank fails, the launcher stops the others.
    """
    import logging

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # the elastic agent's own log lines (its loggers set their levels): kfqn reports instead
    quiet_loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
                     if n.startswith(("torch.distributed.elastic", "torch.distributed.launcher"))]
    levels = [lg.level for lg in quiet_loggers]
    env_before = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", ENV_LAUNCHED,
                                                 "TORCHELASTIC_SIGNALS_TO_HANDLE")}
    os.environ[ENV_LAUNCHED] = "1"
    if not threads and "OMP_NUM_THREADS" not in os.environ:  # as torchrun: no oversubscription
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                                                   signal.SIGQUIT)}
    try:
        for lg in quiet_loggers:
            lg.setLevel(logging.CRITICAL)
        with tempfile.TemporaryDirectory(prefix="kfqn-launch-") as logs:
            config = LaunchConfig(
                min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                monitor_interval=0.1, logs_specs=DefaultLogsSpecs(log_dir=logs),
                local_addr="localhost")
            try:
                elastic_launch(config, sys.executable)("-m", "kfqn", *argv)
            except ChildFailedError as exc:
                return _failure(exc)
            except (SignalException, KeyboardInterrupt) as exc:
                sig = getattr(exc, "sigval", signal.SIGINT)
                return LaunchResult(130 if sig == signal.SIGINT else 128 + int(sig),
                                    error=f"stopped by {signal.Signals(sig).name}")
        return LaunchResult(0)
    finally:
        for s, h in handlers.items():
            if h is not None:
                signal.signal(s, h)
        for lg, level in zip(quiet_loggers, levels):
            lg.setLevel(level)
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


#: what a rank reports when another one died under it (not the cause of a failure)
_PEER_LOST = ("closed by peer", "reset by peer", "broken pipe", "distbackenderror",
              "connection refused", "signal 15", "sigterm")


def _message(failure: Any) -> tuple[str, str]:
    """(one-line error, traceback) of a failed rank, from its error file when it wrote one."""
    data = getattr(failure, "error_file_data", None)
    data = data.get("message") if isinstance(data, dict) else None
    if isinstance(data, dict):
        text = str(data.get("message") or "")
        trace = str((data.get("extraInfo") or {}).get("py_callstack") or "")
    else:
        text, trace = str(data or failure.message or ""), ""
    text = " ".join(text.split())
    if text.startswith("To enable traceback"):  # no error file: nothing said
        text = ""
    return text, trace


def _failure(exc: Any) -> LaunchResult:
    """The root cause among the failed ranks: the earliest, and an error of its own rather
    than a lost connection to a rank that had died."""
    def key(item):
        rank, f = item
        text = _message(f)[0].lower()
        return (any(p in text for p in _PEER_LOST), f.timestamp, rank)

    failures = exc.failures
    rank, first = min(failures.items(), key=key)
    codes = {f.exitcode for f in failures.values()}
    message, trace = _message(first)
    if first.exitcode < 0:
        message = message or f"killed by signal {-first.exitcode} ({first.signal_name()})"
    if codes == {130}:
        code = 130
    elif first.exitcode == 2:
        code = 2
    else:
        code = 1
    return LaunchResult(code, rank, message, first.exitcode, trace)


__all__ = ["DistContext", "Environment", "LaunchResult", "SINGLE", "check_batch", "detect",
           "first_host", "init", "launch", "launched_by_kfqn", "record_error", "timeout_seconds"]
