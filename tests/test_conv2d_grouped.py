"""Grouped and depthwise Conv2d (kfqn/layers/conv2d_grouped.py): one Kronecker block per group.
Oracles: each block's statistics equal those of an explicit unfold of its group's channels; a
grouped convolution trains exactly like the same groups written as separate convolutions;
kbfgs, kfbfgs_cnn and kfac train a depthwise-separable CNN and resume exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfqn
from helpers import assert_resumes_exactly, batches, make_closure, quiet, teacher_data
from kfqn.layers.conv2d_grouped import GroupedConv2dAdapter

F64 = torch.float64
CASES = GroupedConv2dAdapter.examples()


@pytest.mark.parametrize("i", range(len(CASES)))
def test_each_block_matches_an_explicit_per_group_unfold(i):
    module, shape = CASES[i]
    module = module.double()
    torch.manual_seed(i)
    x = torch.randn(*shape, dtype=F64)
    out = module(x)
    gout = torch.randn_like(out)
    out.backward(gout)
    blocks = GroupedConv2dAdapter(module).blocks("c")
    assert [n for n, _ in blocks] == [f"c.group{k}" for k in range(module.groups)]
    g = module.groups
    cin, cout = module.in_channels // g, module.out_channels // g
    pad = 0 if module.padding == "valid" else module.padding
    for k, (_, b) in enumerate(blocks):
        xs = x[:, k * cin:(k + 1) * cin]
        cols = F.unfold(xs, module.kernel_size, dilation=module.dilation, padding=pad,
                        stride=module.stride).transpose(1, 2)             # (m, T, cin kh kw)
        if module.bias is not None:
            cols = torch.cat([cols, torch.ones(*cols.shape[:2], 1, dtype=F64)], 2)
        m, t, d_a = cols.shape
        assert (b.d_a, b.d_g) == (d_a, cout)
        torch.testing.assert_close(b.patches(x), cols)
        torch.testing.assert_close(b.input_covariance(x), torch.einsum("mta,mtb->ab", cols, cols) / m)
        s = torch.randn(d_a, dtype=F64)
        torch.testing.assert_close(b.hessian_action(x, s), torch.einsum("mta,mt->a", cols, cols @ s) / m)
        torch.testing.assert_close(b.input_mean(x), cols.mean((0, 1)))
        gk = gout[:, k * cout:(k + 1) * cout]
        torch.testing.assert_close(b.grad_output_mean(gout), gk.mean((0, 2, 3)) * m)
        # the block's gradient is its slice of the weight (and bias) gradient, and split inverts it
        wk = module.weight.grad[k * cout:(k + 1) * cout].reshape(cout, -1)
        mbar = wk if module.bias is None else torch.cat(
            [wk, module.bias.grad[k * cout:(k + 1) * cout, None]], 1)
        torch.testing.assert_close(b.homogeneous_grad(), mbar)
        # and the explicit per-group weight gradient sum_i sum_t g a^T equals it
        gp = gk.reshape(m, cout, -1).transpose(1, 2)
        torch.testing.assert_close(torch.einsum("mtg,mta->ga", gp, cols), mbar)
        parts = b.split(mbar)
        torch.testing.assert_close(parts[0], module.weight.grad[k * cout:(k + 1) * cout])


class SplitConv(nn.Module):
    """The groups of a grouped convolution written as separate convolutions."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        g = conv.groups
        cin, cout = conv.in_channels // g, conv.out_channels // g
        self.cin = cin
        self.parts = nn.ModuleList()
        for k in range(g):
            c = nn.Conv2d(cin, cout, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                          bias=conv.bias is not None).to(conv.weight.dtype)
            with torch.no_grad():
                c.weight.copy_(conv.weight[k * cout:(k + 1) * cout])
                if conv.bias is not None:
                    c.bias.copy_(conv.bias[k * cout:(k + 1) * cout])
            self.parts.append(c)

    def forward(self, x):
        return torch.cat([c(x[:, k * self.cin:(k + 1) * self.cin])
                          for k, c in enumerate(self.parts)], 1)


def dw_separable(split: bool = False) -> nn.Module:
    torch.manual_seed(2)
    dw = nn.Conv2d(3, 6, 3, padding=1, groups=3)
    pw = nn.Conv2d(6, 8, 1)
    gc = nn.Conv2d(8, 8, 3, stride=2, groups=2)
    head = nn.Linear(8 * 3 * 3, 4)
    if split:
        dw, gc = SplitConv(dw), SplitConv(gc)
    return nn.Sequential(dw, nn.Tanh(), pw, nn.Tanh(), gc, nn.Tanh(), nn.Flatten(), head).double()


def _data():
    x, y = teacher_data(96)
    return x.double(), y


@pytest.mark.parametrize("preset", ["kbfgs", "kfbfgs_cnn", "kfac"])
def test_a_grouped_conv_trains_like_its_groups_written_apart(preset):
    x, y = _data()
    runs = []
    for split in (False, True):
        model = dw_separable(split)
        opt = quiet(kfqn.build_optimizer, model, preset, factor_dtype="float64", lr=0.1)
        assert not opt.unsupported
        with opt.warm_start():
            for xb in x.split(32):
                model(xb)
        for (xb, yb), _ in zip(batches(x, y, 32), range(6)):
            opt.step(make_closure(opt, model, xb, yb))
        runs.append((model, opt))
    (grouped, og), (split, os_) = runs
    assert "0.group2" in og.layers and "4.group1" in og.layers
    assert len(og.layers) == len(os_.layers) == 3 + 1 + 2 + 1
    w = split[0].parts[1].weight
    torch.testing.assert_close(grouped[0].weight[2:4], w, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(grouped[4].weight[4:8], split[4].parts[1].weight, rtol=1e-9,
                               atol=1e-11)
    torch.testing.assert_close(grouped[7].weight, split[7].weight, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("preset", ["kbfgs", "kfbfgs_cnn", "kfac"])
def test_depthwise_separable_cnn_trains_and_resumes(preset):
    x, y = teacher_data(128)
    model = dw_separable().float()
    opt = quiet(kfqn.build_optimizer, model, preset)
    assert not opt.unsupported and sum(".group" in n for n in opt.layers) == 5
    with opt.warm_start():
        model(x)
    first = float(F.cross_entropy(model(x), y).detach())
    data = batches(x, y, 32)
    for _ in range(15):
        opt.step(make_closure(opt, model, *next(data)))
    assert float(F.cross_entropy(model(x), y).detach()) < 0.99 * first  # it learns (sgd_m: 0.98)
    assert_resumes_exactly(opt, model, dw_separable().float(),
                           lambda m: quiet(kfqn.build_optimizer, m, preset), data)


def test_grouped_adapter_is_registered_from_its_own_file():
    reg = kfqn.default_registry()
    assert reg.get("layer_adapter", "conv2d_grouped").__module__ == "kfqn.layers.conv2d_grouped"
