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
