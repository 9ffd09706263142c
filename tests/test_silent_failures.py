"""No silent failure: a claimed layer is never frozen, a compiled model trains as the eager one,
no memory is held across steps.

* A small transformer (Embedding, MultiheadAttention, TransformerEncoderLayer, LayerNorm,
  Linear): under every preset, every parameter with a non-zero gradient moves in one step.
  ``nn.MultiheadAttention.out_proj`` (whose forward never runs) is refused by name.
* A layer whose weights another module reads directly (its forward never runs) is found at
  the first step, named in a warning and trained by the first-order fallback; checkpoints
  record that, and resume exactly.
* ``torch.compile(model)``: warm start + 30 steps agree with the eager copy (float64, CPU).
* Live tensors (gc) after 200 steps equal those after 20, for every preset.
"""
from __future__ import annotations

import gc
import io
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfqn
from kfqn.core.errors import UnsupportedModuleError
from helpers import all_presets, make_closure

PRESETS = all_presets()


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 20, d: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.enc = nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0,
                                              batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.norm(self.enc(h)).mean(1))


@pytest.mark.parametrize("preset", PRESETS)
def test_transformer_every_parameter_with_a_gradient_moves(preset):
    torch.manual_seed(0)
    model = TinyTransformer()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 20, (8, 5), generator=g), torch.randint(0, 3, (8,), generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = kfqn.build_optimizer(model, preset)
    if "out_proj" in "".join(opt.preconditioned_modules):
        pytest.fail(f"out_proj claimed: {opt.preconditioned_modules}")
    if opt.needs_warm_start:
        with opt.warm_start():
            model(x)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step(make_closure(opt, model, x, y))
    grads = {n: p.grad for n, p in model.named_parameters()}
    frozen = [n for n, p in model.named_parameters()
              if grads[n] is not None and bool(grads[n].abs().sum() > 0)
              and torch.equal(p.detach(), before[n])]
    assert not frozen, f"{preset}: parameters with gradients that did not move: {frozen}"
    assert grads["attn.out_proj.weight"] is not None
    if opt.preconditioned_modules:  # the quasi-Newton presets say which modules they left out
        warned = " ".join(str(w.message) for w in caught)
        assert "'attn.out_proj'" in warned and "'enc.self_attn.out_proj'" in warned, warned
        assert "head" in opt.preconditioned_modules and "enc.linear1" in opt.preconditioned_modules


def test_unsupported_error_names_out_proj():
    """The attention's own in_proj parameters are frozen (else they are refused first, having
    no adapter): out_proj, a Linear an adapter would take, is refused by name."""
    model = TinyTransformer()
    for mha in (model.attn, model.enc.self_attn):
        mha.in_proj_weight.requires_grad_(False)
        mha.in_proj_bias.requires_grad_(False)
    with pytest.raises(UnsupportedModuleError, match=r"'attn\.out_proj'.*uses out_proj\.weight"):
        kfqn.build_optimizer(model, "kbfgs", unsupported="error")


class SharedWeights(nn.Module):
    """``proj``'s weights are read directly by the forward: its own forward never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.proj = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.inp(x)), self.proj.weight, self.proj.bias)


def _data(n=16):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("preset", ["kbfgs", "kfbfgs_ll_cnn", "kfac"])
def test_uncaptured_layer_is_released_at_the_first_step(preset):
    torch.manual_seed(0)
    model = SharedWeights()
    no_warm = {"kbfgs": {"a_side": {"warm_start": False}},
               "kfac": {"preconditioner": {"warm_start": False}}}.get(preset, {})
    opt = kfqn.build_optimizer(model, preset, **no_warm)
    assert "proj" in opt.preconditioned_modules  # nothing tells them apart before a step
    x, y = _data()
    w0 = model.proj.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"'proj'.*forward never ran"):
        opt.step(make_closure(opt, model, x, y))
    assert not torch.equal(model.proj.weight, w0)
    assert opt.preconditioned_modules == ["inp"]
    assert "proj.weight" in opt.fallback_params and "proj" in opt.describe()


def test_uncaptured_layer_error_policy_raises_before_anything_moves():
    model = SharedWeights()
    opt = kfqn.build_optimizer(model, "kfbfgs_cnn", unsupported="error")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UnsupportedModuleError, match="'proj'"):
        opt.step(make_closure(opt, model, *_data()))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_release_survives_checkpoint_and_resume():
    x, y = _data(32)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]

    def build(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return kfqn.build_optimizer(model, "kfbfgs_cnn", factor_dtype="float64")

    torch.manual_seed(0)
    full = SharedWeights().double()
    torch.manual_seed(0)
    part = SharedWeights().double()
    o_full = build(full)
    o_part = build(part)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for xb, yb in batches[:2]:
            o_full.step(make_closure(o_full, full, xb.double(), yb))
            o_part.step(make_closure(o_part, part, xb.double(), yb))
        buf = io.BytesIO()
        torch.save({"model": part.state_dict(), "opt": o_part.state_dict()}, buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=False)
        resumed = SharedWeights().double()
        resumed.load_state_dict(ckpt["model"])
        o_res = build(resumed)
        o_res.load_state_dict(ckpt["opt"])
        assert o_res.preconditioned_modules == ["inp"]
        for xb, yb in batches[2:]:
            o_full.step(make_closure(o_full, full, xb.double(), yb))
            o_res.step(make_closure(o_res, resumed, xb.double(), yb))
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


# -- torch.compile -------------------------------------------------------------------------------
def _conv_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


COMPILE_BACKEND = "inductor" if shutil.which("g++") or shutil.which("cc") else "aot_eager"


@pytest.mark.parametrize("preset", PRESETS)
def test_compiled_model_trains_as_the_eager_one(preset):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    results = {}
    for compiled in (False, True):
        model = _conv_mlp().double()
        run = torch.compile(model, backend=COMPILE_BACKEND) if compiled else model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = kfqn.build_optimizer(run, preset, factor_dtype="float64")
            if opt.needs_warm_start:
                with opt.warm_start():
                    for xb in x.split(16):
                        run(xb)
            for k in range(30):
                sl = slice((k % 4) * 16, (k % 4 + 1) * 16)
                opt.step(make_closure(opt, run, x[sl], y[sl]))
        results[compiled] = (torch.cat([p.detach().flatten() for p in model.parameters()]),
                             opt.factors(), list(opt.state_dict()["layers"]))
    (p_eager, f_eager, n_eager), (p_comp, f_comp, n_comp) = results[False], results[True]
    assert n_comp == n_eager  # the same names: checkpoints move between the two
    torch.testing.assert_close(p_comp, p_eager, rtol=1e-5, atol=1e-7)
    for layer, facs in f_eager.items():
        for key, mat in facs.items():
            torch.testing.assert_close(f_comp[layer][key], mat, rtol=1e-5, atol=1e-7)


# -- memory ----------------------------------------------------------------------------------------
def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


@pytest.mark.parametrize("preset", PRESETS)
def test_no_tensor_is_held_across_steps(preset):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kfqn.build_optimizer(model, preset)
        x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
        counts = {}
        for k in range(200):
            opt.step(make_closure(opt, model, x, y))
            if k + 1 in (20, 200):
                counts[k + 1] = _live_tensors()
    assert counts[200] == counts[20], counts
