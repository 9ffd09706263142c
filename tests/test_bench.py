"""Smoke tests of the benchmark harness (``kfqn bench`` / :mod:`kfqn.bench`).

A tiny suite (two small models, a few methods, two timed rounds) runs end to end in a few
seconds; the JSON it writes is checked field by field. The CUDA test proves that no preset
synchronises with the host inside ``step()``.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import kfqn
from kfqn import bench
from kfqn.core.errors import ConfigError

TINY_SUITE = {
    "methods": [
        {"label": "sgd_m", "baseline": "sgd_m"},
        {"label": "adam", "baseline": "adam"},
        {"label": "adam_torch", "baseline": "adam", "impl": "torch"},
        {"label": "kbfgs", "preset": "kbfgs"},
        {"label": "kfbfgs_l_cnn+next", "preset": "kfbfgs_l_cnn",
         "set": ["g_side.source=next_iterate"]},
        {"label": "kfbfgs_ll_cnn", "preset": "kfbfgs_ll_cnn"},
    ],
    "include_other_presets": False,
    "baselines": {"adam": {"class": "Adam", "lr": 1e-3, "betas": [0.9, 0.9]},
                  "sgd_m": {"class": "SGD", "lr": 0.01, "momentum": 0.9, "dampening": 0.9}},
    "models": {
        "ae": {"model": "mlp_autoencoder", "input_shape": [1, 6, 6], "num_classes": None,
               "batch": 16, "options": {"hidden": [12, 6], "code": 3}},
        "cnn": {"model": "digits_cnn", "input_shape": [1, 8, 8], "num_classes": 10,
                "batch": 8, "options": {"width": 0.25}},
    },
    "modes": {"full": {"models": ["ae", "cnn"], "warmup": 1, "repeats": 2, "threads": 1},
              "quick": {"models": ["ae"], "warmup": 0, "repeats": 2, "threads": 1}},
}
TINY_TARGETS = {"targets": [
    {"id": "t_time", "description": "tiny time", "method": "kfbfgs_l_cnn+next", "model": "ae",
     "metric": "ratio_to_adam", "max": 1000.0},
    {"id": "t_state", "description": "tiny state", "method": "kfbfgs_ll_cnn", "model": "cnn",
     "metric": "state_ratio_to_adam", "max": 0.0},
    {"id": "t_missing", "description": "not run", "method": "kbfgs", "model": "nowhere",
     "metric": "ratio_to_adam", "max": 1.0},
]}
RECORD_FIELDS = {
    "model": str, "preset": str, "device": str, "step_ms_median": float, "ratio_to_adam": float,
    "state_bytes": int, "state_ratio_to_adam": float, "peak_bytes": int,
    "phase_ms_median": dict, "step_ms_q25": float, "step_ms_q75": float, "step_ms_min": float,
    "step_ms_max": float, "first_step_ms": float, "resident_bytes": int, "impl": str,
    "batch": int, "repeats": int,
}


def _write(tmp_path: Path) -> tuple[Path, Path]:
    suite, targets = tmp_path / "suite.yaml", tmp_path / "targets.yaml"
    suite.write_text(yaml.safe_dump(TINY_SUITE))
    targets.write_text(yaml.safe_dump(TINY_TARGETS))
    return suite, targets


def test_tiny_suite_end_to_end(tmp_path, capsys):
    suite, targets = _write(tmp_path)
    out = tmp_path / "bench.json"
    t0 = time.perf_counter()
    status = bench.main(["--suite", str(suite), "--targets", str(targets), "--device", "cpu",
                         "--json", str(out)])
    elapsed = time.perf_counter() - t0
    assert status == 0
    assert elapsed < 20, f"tiny bench took {elapsed:.1f} s"
    doc = json.loads(out.read_text())
    assert doc["schema"] == bench.SCHEMA
    assert doc["meta"]["repeats"] == 2 and doc["meta"]["threads"] == 1
    records = doc["records"]
    labels = [m["label"] for m in TINY_SUITE["methods"]]
    assert [(r["model"], r["preset"]) for r in records] == \
        [(m, l) for m in ("ae", "cnn") for l in labels]
    for r in records:
        assert r["error"] is None, r
        for key, typ in RECORD_FIELDS.items():
            assert isinstance(r[key], typ), (key, r[key])
        assert r["device"] == "cpu" and r["repeats"] == 2
        assert r["step_ms_min"] <= r["step_ms_q25"] <= r["step_ms_median"] \
            <= r["step_ms_q75"] <= r["step_ms_max"]
        phases = r["phase_ms_median"]
        assert "forward_backward" in phases and all(v >= 0 for v in phases.values())
        assert r["peak_bytes"] >= 2 * r["param_bytes"]
        assert r["host_syncs"] is None   # checked on CUDA only
    by = {(r["model"], r["preset"]): r for r in records}
    for model in ("ae", "cnn"):
        assert by[(model, "adam")]["ratio_to_adam"] == pytest.approx(1.0)
        assert by[(model, "adam_torch")]["impl"] == "torch.optim.Adam"
        torch_adam = by[(model, "adam_torch")]
        n_params = torch_adam["param_bytes"]
        assert torch_adam["state_bytes"] >= 2 * n_params  # exp_avg + exp_avg_sq (+ step)
        assert "extra_pass" in by[(model, "kbfgs")]["phase_ms_median"]
        assert "extra_pass" not in by[(model, "kfbfgs_l_cnn+next")]["phase_ms_median"]
        assert by[(model, "kbfgs")]["warm_start_ms"] > 0
    rows = {(t["id"]): t for t in doc["targets"]}
    assert rows["t_time"]["status"] == "PASS"
    assert rows["t_state"]["status"] == "MISS" and rows["t_state"]["value"] > 0
    assert rows["t_missing"]["status"] == "SKIP" and rows["t_missing"]["note"] == "not run"
    printed = capsys.readouterr().out
    assert "| model | device | method | step ms (median)" in printed
    assert "| tiny time | cpu |" in printed and "PASS" in printed and "MISS" in printed


def test_quick_mode_and_strict_exit(tmp_path):
    suite, targets = _write(tmp_path)
    status = bench.main(["--suite", str(suite), "--targets", str(targets), "--quick",
                         "--presets", "kfbfgs_ll_cnn", "--no-memory", "--strict"])
    assert status == 0  # only t_state could miss, and its model is not in quick mode
    status = bench.main(["--suite", str(suite), "--targets", str(targets), "--quick",
                         "--models", "cnn", "--presets", "kfbfgs_ll_cnn", "--no-memory",
                         "--strict", "--batch", "cnn=4"])
    assert status == 3


def test_unknown_names_list_the_allowed_ones(tmp_path, capsys):
    suite, targets = _write(tmp_path)
    common = ["--suite", str(suite), "--targets", str(targets)]
    assert bench.main([*common, "--models", "resnet9000"]) == 2
    err = capsys.readouterr().err
    assert "resnet9000" in err and "ae, cnn" in err
    assert bench.main([*common, "--presets", "kbfgs,lion"]) == 2
    err = capsys.readouterr().err
    assert "'lion'" in err and "kfbfgs_l_cnn+next" in err
    with pytest.raises(ConfigError, match="allowed: ae, cnn"):
        bench.resolve_models(TINY_SUITE, "full", batches={"vgg": 3})


def test_repository_definitions_are_consistent():
    suite = bench.load_suite()
    labels = {m.label for m in bench.resolve_methods(suite)}
    assert {"adam", "sgd_m", "kbfgs", "kfbfgs_l_cnn+next", "kfbfgs_ll_cnn"} <= labels
    for mode in ("full", "quick"):
        for spec in bench.resolve_models(suite, mode):
            assert spec.batch >= 1
    for t in bench.load_targets():
        assert t["model"] in suite["models"], t
        assert t["method"] in labels, t
        assert t["metric"] in bench.suite.TARGET_METRICS


def test_adam_is_always_the_reference():
    methods = bench.resolve_methods(TINY_SUITE, "kbfgs")
    assert [m.label for m in methods] == ["adam", "kbfgs"]


def _small_cuda_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 3 * 3, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).cuda()


#: presets that do read back from the device inside step(), and why
SYNCS_ON_CUDA = {
    "shampoo": "inverse 4th roots by torch.linalg.eigh, which reads its status back to the host "
               "(every inverse_every steps)",
}


def _all_preset_variants() -> list:
    presets = kfqn.default_registry().names("preset")
    out = [pytest.param(p, [], marks=pytest.mark.xfail(raises=RuntimeError, strict=True,
                                                       reason=SYNCS_ON_CUDA[p]))
           if p in SYNCS_ON_CUDA else pytest.param(p, []) for p in presets]
    return out + [pytest.param("kfbfgs_l_cnn", ["g_side.source=next_iterate"]),
                  pytest.param("kfbfgs_cnn", ["trial_pass_grads=all"])]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset,dotlist", _all_preset_variants())
def test_step_never_synchronises_with_the_host(preset, dotlist):
    model = _small_cuda_model()
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.randn(16, 3, 8, 8, device="cuda", generator=g) for _ in range(2)]
    ys = [torch.randint(0, 4, (16,), device="cuda", generator=g) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kfqn.build_optimizer(model, preset, dotlist=dotlist)
    if getattr(opt, "needs_warm_start", False):
        with opt.warm_start():
            for x in xs:
                model(x)

    def closure(x: torch.Tensor, y: torch.Tensor):
        def run():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        return run

    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for i in range(4):  # the first step initialises factors: it must not sync either
            opt.step(closure(xs[i % 2], ys[i % 2]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_runs_on_cuda(tmp_path):
    suite, targets = _write(tmp_path)
    out = tmp_path / "bench.json"
    assert bench.main(["--suite", str(suite), "--targets", str(targets), "--device", "cuda",
                       "--quick", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    assert {r["device"] for r in records} == {"cuda"}
    assert all(r["memory_method"] == "cuda_max_memory_allocated" for r in records)
    assert all(r["peak_bytes"] > 0 for r in records)
    for r in records:   # every step of the tiny suite's methods was checked, none synchronised
        assert r["host_syncs"] == 0, (r["preset"], r["host_sync_at"])


def test_device_restricted_targets_are_left_out_elsewhere():
    records = [{"preset": "kbfgs", "model": "ae", "device": "cpu", "host_syncs": None,
                "error": None}]
    targets = [{"id": "t", "method": "kbfgs", "model": "ae", "metric": "host_syncs", "max": 0,
                "devices": ["cuda"]}]
    assert bench.evaluate_targets(records, targets) == []
    records[0]["device"] = "cuda"
    records[0]["host_syncs"] = 1
    assert [r["status"] for r in bench.evaluate_targets(records, targets)] == ["MISS"]


# -- op counts (kfqn bench --ops) ------------------------------------------------------------------
def test_op_counter_counts_a_known_function_exactly():
    from kfqn.bench.ops import count_call

    a, b, c = torch.randn(3, 4), torch.randn(4, 5), torch.randn(3, 5)
    counter = count_call(lambda: a @ b + c)          # matmul of matrices decomposes to mm
    assert counter.total == 2
    assert counter.names == {"aten.mm": 1, "aten.add": 1}
    counter = count_call(lambda: torch.relu(a).sum() * 2)
    assert counter.total == 3 and counter.closure == 0


def _tiny_linear() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return torch.nn.Linear(3, 2), torch.randn(4, 3)


def test_closure_ops_are_subtracted_exactly():
    """A hand-counted torch.optim.SGD step: one aten.add_ per parameter tensor, plus the
    record_function enter/exit that torch.optim.Optimizer.step dispatches."""
    from kfqn.bench.ops import count_call, count_step

    model, x = _tiny_linear()
    opt = bench.FirstOrder(torch.optim.SGD(model.parameters(), lr=0.1, foreach=False))

    def closure():
        opt.zero_grad()
        loss = model(x).square().sum()
        loss.backward()
        return loss

    alone = count_call(closure).total
    ops = count_step(opt, closure)
    assert ops.closure_calls == 1
    assert ops.closure == alone > 0
    assert ops.optimizer == ops.total - ops.closure == 2 + 2
    assert ops.names == {"aten.add_": 2, "profiler._record_function_enter_new": 1,
                         "profiler._record_function_exit": 1}


@pytest.mark.parametrize("preset", ["sgd_m", "kfbfgs_l_cnn+next", "kbfgs"])
def test_capture_hooks_and_the_trial_pass_are_optimizer_ops(preset):
    """The closure's own ops inside a step are those of the closure alone (kfqn's capture hooks
    count as the optimizer's); a trial-pass preset calls it twice, the second time with the
    parameters frozen, hence fewer than twice the ops."""
    from kfqn.bench.ops import count_closure_alone, count_step, needs_trial

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 6))
    x = torch.rand(8, 6)
    name, _, rest = preset.partition("+")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kfqn.build_optimizer(model, name, dotlist=["g_side.source=next_iterate"] * bool(rest))

    def closure():
        opt.zero_grad()
        loss = (model(x) - x).square().mean()
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            opt.step(closure)
        ops = count_step(opt, closure, sites=True)
    alone = count_closure_alone(opt, closure)
    calls = 2 if needs_trial(opt) else 1
    assert needs_trial(opt) == (preset == "kbfgs")
    assert ops.closure_calls == calls
    if calls == 1:
        assert ops.closure == alone
    else:
        assert alone < ops.closure < 2 * alone
    if opt.layers:
        hooks = sum(n for site, n in ops.entries.items() if site.startswith("layers/capture.py"))
        assert hooks > 0
    assert sum(ops.names.values()) == ops.optimizer == sum(ops.sites.values())


def _ops_targets(tmp_path: Path, limit: float) -> Path:
    path = tmp_path / f"ops_targets_{limit:g}.yaml"
    path.write_text(yaml.safe_dump({"targets": [
        {"id": "t_ops", "description": "tiny op budget", "method": "kbfgs", "model": "ae",
         "metric": "ops_per_layer", "max": limit}]}))
    return path


def test_ops_columns_in_the_table_and_json(tmp_path, capsys):
    suite, _ = _write(tmp_path)
    out = tmp_path / "ops.json"
    status = bench.main(["--suite", str(suite), "--targets", str(_ops_targets(tmp_path, 1e6)),
                         "--quick", "--presets", "kbfgs,adam_torch,sgd_m", "--no-memory",
                         "--repeats", "1", "--ops", "--ops-steps", "2", "--ops-verbose", "5",
                         "--json", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "| opt ops / layer |" in printed and "| opt ops / param tensor |" in printed
    assert "PASS (per layer <= 1e+06)" in printed
    assert "operators: aten." in printed and "kfqn functions:" in printed
    records = {r["preset"]: r for r in json.loads(out.read_text())["records"]}
    kb = records["kbfgs"]
    assert kb["ops_error"] is None and kb["ops_counted_steps"] == 2 and kb["ops_warm_steps"] >= 3
    assert kb["ops_closure_calls"] == 2
    assert kb["ops_layers"] == kb["ops_param_tensors"] // 2 == 6  # Linear: weight and bias
    assert kb["ops_step"] == kb["ops_closure"] + kb["ops_optimizer"]
    assert kb["ops_per_layer"] == pytest.approx(kb["ops_optimizer"] / 6)
    assert kb["ops_per_layer_max"] >= kb["ops_per_layer"] > 0
    assert kb["ops_top_names"] and kb["ops_top_sites"]
    for label in ("adam_torch", "sgd_m"):
        assert records[label]["ops_closure_calls"] == 1
        assert records[label]["ops_closure"] == records[label]["ops_closure_alone"]
        assert records[label]["ops_per_layer"] is None
        assert records[label]["ops_per_param_tensor"] > 0
    assert records["adam_torch"]["ops_per_param_tensor_x_torch_adam"] == pytest.approx(1.0)


def test_check_fails_when_the_op_budget_is_exceeded(tmp_path, capsys):
    suite, _ = _write(tmp_path)
    common = ["--suite", str(suite), "--quick", "--presets", "kbfgs", "--no-memory",
              "--repeats", "1", "--ops-steps", "1"]
    tight = str(_ops_targets(tmp_path, 1))
    assert bench.main([*common, "--targets", tight, "--ops"]) == 0   # reported, not enforced
    printed = capsys.readouterr().out
    assert "FAIL (per layer <= 1)" in printed and "| tiny op budget | cpu |" in printed
    assert bench.main([*common, "--targets", tight, "--check"]) == 3
    assert "MISS" in capsys.readouterr().out
    loose = str(_ops_targets(tmp_path, 1e6))
    assert bench.main([*common, "--targets", loose, "--check"]) == 0
    # without --ops the op targets are skipped and say why
    assert bench.main([*common, "--targets", tight]) == 0
    assert "SKIP (ops not counted: run with --ops)" in capsys.readouterr().out


# -- data-parallel communication (kfqn bench --nproc N, --project) ---------------------------
DIST_SPEC = dict(key="cnn", model="digits_cnn", input_shape=(1, 8, 8), num_classes=10, batch=16,
                 options={"width": 0.5})
DIST_PRESETS = ("kbfgs", "kfbfgs_cnn", "kfac", "shampoo", "adam")


def _closed_form(preset: str, dims: list[tuple[str, int, int]]) -> tuple[int, int]:
    """Steady-state (calls, bytes) per step of the float32 presets, as kfqn/bench/comm_model.py
    writes them down: L layers, sums of d_a, d_g and their squares."""
    n = len(dims)
    sa, sg = sum(a for _, a, _ in dims), sum(g for _, _, g in dims)
    sa2, sg2 = sum(a * a for _, a, _ in dims), sum(g * g for _, _, g in dims)
    return {"kbfgs": (2, 4 * (4 * sg + 1 + sa2 + sa)),
            "kfbfgs_cnn": (2, 4 * (4 * sg + 1 + 2 * sa)),
            "kfac": (1, 4 * (2 * sg + 1 + sa2 + sg2)),
            "shampoo": (1, 4 * (2 * sg + 1)),
            "adam": (1, 4)}[preset]


@pytest.mark.skipif(not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_two_gloo_ranks_send_exactly_the_formula(tmp_path):
    """One spawned 2-rank group (kfqn.bench.distributed, DDP + gloo) runs every preset; the
    statistics all-reduces counted by opt.comm at each step, the first included, equal the
    formula of kfqn.bench.comm_model for that step, and the steady steps its closed form."""
    from kfqn.bench import comm_model
    from kfqn.bench.distributed import run_group

    spec = bench.ModelSpec(**DIST_SPEC)
    methods = [bench.MethodSpec(p, p) for p in DIST_PRESETS]
    recs, tail = run_group([spec], methods, {}, world=2, warmup=0, steps=3, timeout=240,
                           pg_timeout=60, folder=tmp_path, first_step_timed=True)
    assert tail == "", tail
    net = bench.Case(spec, methods[0], {}, torch.device("cpu"), 0).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dims = comm_model.layer_dims(kfqn.build_optimizer(net, "kbfgs"))
    assert len(dims) == 4
    for rec in recs:
        preset = rec["preset"]
        assert rec["error"] is None, (preset, rec["error"])
        assert rec["calls_by_step"] == rec["formula_calls_by_step"], preset
        assert rec["bytes_by_step"] == rec["formula_bytes_by_step"], preset
        assert rec["formula_match"] is True
        calls, nbytes = _closed_form(preset, dims)
        assert rec["calls_by_step"][1:] == [calls, calls], preset
        assert rec["bytes_by_step"][1:] == [nbytes, nbytes], preset
        assert (rec["formula_calls_steady"], rec["formula_bytes_steady"]) == (calls, nbytes)
        assert rec["grad_bytes"] == 4 * sum(p.numel() for p in net.parameters())
        assert rec["steps"] == 3 and rec["step_ms_median"] > 0 and rec["local_batch"] == 8
    first = {r["preset"]: r for r in recs}
    # KF-BFGS-CNN's first step also averages each layer's first-batch A (d_a^2) in the first
    # round, and takes the Hessian action from it (no call of its own)
    assert first["kfbfgs_cnn"]["bytes_by_step"][0] == _closed_form("kfbfgs_cnn", dims)[1] + \
        4 * sum(a * a - a for _, a, _ in dims)
    assert first["kfbfgs_cnn"]["calls_by_step"][0] == 2


def _count_steps(spec: dict, steps: int = 5, dtype=torch.float32, warm: bool = True):
    """(measured, formula) (calls, bytes) per step of a one-process optimizer that pretends to
    be one of two ranks (comm_model.CountingComm)."""
    from torch import nn

    from kfqn.bench import comm_model

    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2),
                        nn.Tanh(), nn.Flatten(), nn.Linear(36, 6), nn.Tanh(),
                        nn.Linear(6, 3)).to(dtype)
    comm = comm_model.CountingComm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kfqn.build_optimizer(net, spec, comm=comm)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, 2, 7, 7, generator=g, dtype=dtype)
        y = torch.randint(0, 3, (8,), generator=g)
        if warm and opt.needs_warm_start:
            with opt.warm_start():
                net(x)
        got, want = [], []
        for _ in range(steps):
            exp = comm_model.expected_comm(opt, 1)
            c0, b0 = comm.calls, comm.bytes

            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(x), y)
                loss.backward()
                return loss
            opt.step(closure)
            got.append((comm.calls - c0, comm.bytes - b0))
            want.append((exp.calls, exp.bytes))
    return got, want, comm_model.per_step(opt)


@pytest.mark.parametrize("spec, dtype, warm", [
    ({"preset": "kbfgs", "factor_dtype": "float64"}, torch.float64, True),  # one call per pass
    ({"preset": "kbfgs"}, torch.float32, False),               # A from the first batch
    ({"preset": "kfbfgs_ll_cnn"}, torch.float32, True),        # no trial pass, identity start
    ({"preset": "kfac", "preconditioner": {"stats_every": 3}}, torch.float32, True),
    ({"preset": "kfac", "preconditioner": {"name": "ekfac", "inverse_every": 3,
                                           "inverse_warmup": 2}}, torch.float32, True),
    ({"preset": "kbfgs", "placement": "owner"}, torch.float32, True),
    ({"preset": "kfbfgs_cnn", "placement": "owner"}, torch.float32, True),
    ({"preset": "kfac", "placement": "owner"}, torch.float32, True),
], ids=["kbfgs-float64", "kbfgs-no-warm-start", "kfbfgs_ll_cnn", "kfac-T1=3", "ekfac",
        "kbfgs-owner", "kfbfgs_cnn-owner", "kfac-owner"])
def test_formula_follows_dtypes_cadences_and_start_up(spec, dtype, warm):
    got, want, per = _count_steps(spec, dtype=dtype, warm=warm)
    assert got == want
    assert per.calls > 0 and per.bytes > 0
    if spec["preset"] == "kfac" and spec.get("preconditioner", {}).get("stats_every") == 3:
        assert [c for c, _ in got[:4]] == [1, 1, 1, 1]     # one call per pass, always
        nbytes = [b for _, b in got[:4]]                    # statistics at steps 0 and 3 only
        assert nbytes[0] == nbytes[3] > nbytes[1] == nbytes[2]
        assert per.calls == 1
    if dtype == torch.float64:
        assert got[-1][0] == 2                 # one call per pass, float32 parts sent as float64
    if spec.get("placement") == "owner":
        passes = 2 if spec["preset"] != "kfac" else 1
        assert got[-1][0] == passes + 1                   # + the owners' directions


def test_allreduce_model_and_projection(tmp_path, capsys):
    """The link model's arithmetic, and --project end to end on a small model whose compute
    time comes from a given CUDA record."""
    from kfqn.bench import project as P

    assert P.allreduce_s(2, 8e9, 8, 100.0, 10.0) == pytest.approx(2e-5 + 2 * 7 / 8 * 0.08)
    rec = {"model": "digits_cnn", "preset": "kbfgs", "device": "cuda", "batch": 32,
           "step_ms_median": 50.0, "phase_ms_median": {"forward_backward": 10.0}}
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"records": [rec, {**rec, "preset": "adam"}]}))
    out = tmp_path / "proj.json"
    code = bench.main(["--project", "--project-models", "digits_cnn", "--presets", "kbfgs,adam",
                       "--compute", str(path), "--gpus", "8,64", "--link", "64:25:50",
                       "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "step ms @64" in text and "assumptions" in text and "25 GB/s" in text
    rows = {r["preset"]: r for r in json.loads(out.read_text())["rows"]}
    kb = rows["kbfgs"]
    assert kb["compute_source"] == "measured" and kb["compute_ms"] == 50.0
    t64 = P.allreduce_s(kb["stats_calls"], kb["stats_bytes"], 64, 25.0, 50.0) * 1e3
    g64 = P.allreduce_s(kb["grad_calls"], kb["grad_bytes"], 64, 25.0, 50.0) * 1e3
    assert kb["step_ms_64"] == pytest.approx(50.0 + t64 + g64)
    assert rows["adam"]["stats_calls"] == 1 and rows["adam"]["stats_bytes"] == 4
    assert bench.main(["--project", "--gpus", "16"]) == 2      # no link figures for 16 GPUs


def test_scaling_table_lists_every_case():
    from kfqn.bench.distributed import scaling_table

    ok = {"model": "m", "preset": "kbfgs", "nproc": 2, "batch": 16, "error": None,
          "step_ms_1": 10.0, "step_ms_n": 8.0, "speedup": 1.25, "calls_per_step": 10.0,
          "bytes_per_step": 2048.0, "formula_bytes_per_step": 2048.0, "formula_match": True,
          "stats_comm_ms_median": 1.5, "grad_bytes": 4096}
    bad = {"model": "m", "preset": "kfac", "nproc": 2, "batch": 16, "error": "boom"}
    table = scaling_table([ok, bad])
    assert "| m | kbfgs | 16 | 10 | 8 | 1.25 | 10 | 2.0 | 2.0 | yes | 1.5 | 4.1 | 0.50 |" in table
    assert "failed: boom" in table
