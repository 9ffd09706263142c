"""``kfqn bench``: step time, phases and memory of every preset against first-order methods.

For each model of the suite (``benchmarks/suite.yaml``) and each device, every method (the kfqn
presets, their listed variants, SGD with momentum and Adam) gets its own copy of the model, built
from the same seed, and the same synthetic batches. After a warm-up, the methods' timed steps are
interleaved round-robin (the order rotates every round) so that machine noise hits all alike.
Reported per (model, method, device):

* the step time (forward and backward included): median, quartiles, min and max;
* per-phase medians from ``opt.last_phase_times`` (forward_backward, extra_pass, factor_updates,
  precondition, fallback); first-order methods report forward_backward and ``update``;
* ``state_bytes``: ``opt.state_bytes()`` (kfqn) or the tensors in ``opt.state`` (torch);
* ``resident_bytes``: what building the optimizer and its first step left allocated, gradients
  excluded (catches buffers that ``state_bytes`` does not count);
* ``peak_bytes`` = parameters + gradients + resident optimizer memory + the largest growth of
  allocated memory during one steady-state step (CPU: a ``torch.profiler`` memory record, since
  RSS and tracemalloc do not isolate one step of one method; CUDA: ``max_memory_allocated``).

Ratios (``ratio_to_adam``, ``state_ratio_to_adam``, ...) are taken against the ``adam`` method:
the registered ``adam`` preset when there is one, else ``torch.optim.Adam(betas=(0.9, 0.9))``;
``ratio_to_torch_adam`` is the step-time ratio against ``torch.optim.Adam`` itself (method
``adam_torch``), since kfqn's Adam fallback and torch's implementation need not cost the same.
A step-time ratio is the median over the timed rounds of the paired ratio (this method's step
over the reference's step in the same round: back to back, same batch), which cancels drifts of
a shared machine's speed; ``ratio_of_medians_to_adam`` is the plain ratio of the two medians.
On CUDA, one more step per method runs under ``torch.cuda.set_sync_debug_mode("error")``:
``host_syncs`` is 1 if it read back from the device (``host_sync_at`` says where), else 0.

With ``--ops`` (:mod:`~kfqn.bench.ops`), after the timing every method takes uncounted steps
until it has taken ``--ops-warm`` (3), then ``--ops-steps`` (20) steps under a
``TorchDispatchMode`` that counts every dispatched op: step ops, the closure's own forward and
backward ops (1 or, with an extra pass, 2 closure calls per step), optimizer ops = the
difference, per preconditioned layer (``ops_per_layer``, of the median step, and
``ops_per_layer_max``) and per parameter tensor beside ``torch.optim.Adam``'s. ``--ops-verbose``
adds the most frequent operators and the kfqn functions that issued them; targets on ``ops_*``
metrics are op budgets, printed PASS/FAIL per row, and ``--check`` exits with status 3 when one
is exceeded.

On CUDA the phase times are host times (the optimizer does not synchronise inside ``step``); the
step time itself is measured between ``torch.cuda.synchronize()`` calls. The targets in
``benchmarks/targets.yaml`` are checked on the ratios of the same run and printed PASS/MISS.

With ``--nproc N`` (:mod:`~kfqn.bench.distributed`) every method runs at 1 and at N
data-parallel ranks instead (CPU, gloo, spawned processes with timeouts, the same global batch):
step times at both, kfqn's statistics all-reduces per step (``opt.comm`` calls and bytes) beside
their formula (:mod:`~kfqn.bench.comm_model`, which the run checks step by step), and DDP's
gradient bytes. ``--project`` (:mod:`~kfqn.bench.project`) prices that formula on ResNet-32 and
VGG16 at 8 and 64 GPUs with a stated link model and measured 1-GPU compute times: a
projection, printed with its assumptions.

Modules: :mod:`~kfqn.bench.suite` (definitions), :mod:`~kfqn.bench.cases` (one method on one
model), :mod:`~kfqn.bench.measure` (timing and memory), :mod:`~kfqn.bench.ops` (op counts),
:mod:`~kfqn.bench.report` (records, targets, tables), :mod:`~kfqn.bench.comm_model`,
:mod:`~kfqn.bench.distributed`, :mod:`~kfqn.bench.project`, :mod:`~kfqn.bench.cli`. Run
``python -m kfqn.bench --help`` (or ``kfqn bench --help``); ``benchmarks/profile_presets.py``
shows where a preset's time goes.
"""
from kfqn.bench.cases import Case, FirstOrder, make_batches
from kfqn.bench.cli import HELP, SCHEMA, add_arguments, main, run
from kfqn.bench.comm_model import (CommCount, CountingComm, expected_comm, per_step,
                                   step_collectives)
from kfqn.bench.measure import AllocationMeter, Result, bench_model, measure_ops
from kfqn.bench.ops import OpCounter, OpsResult, StepOps, count_call, count_step
from kfqn.bench.report import (evaluate_targets, markdown_table, ops_details, ops_table,
                               summarise, targets_table)
from kfqn.bench.suite import (REFERENCE, TORCH_REFERENCE, MethodSpec, ModelSpec, benchmarks_dir,
                              load_suite, load_targets, resolve_methods, resolve_models)

__all__ = [
    "HELP", "SCHEMA", "add_arguments", "run", "main", "Case", "FirstOrder", "make_batches",
    "AllocationMeter", "Result", "bench_model", "measure_ops", "summarise", "evaluate_targets",
    "markdown_table", "targets_table", "ops_table", "ops_details", "OpCounter", "OpsResult",
    "StepOps", "count_call", "count_step", "MethodSpec", "ModelSpec", "benchmarks_dir",
    "load_suite", "load_targets", "resolve_methods", "resolve_models", "REFERENCE",
    "TORCH_REFERENCE", "CommCount", "CountingComm", "expected_comm", "per_step",
    "step_collectives",
]
