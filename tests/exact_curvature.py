"""Exact curvature blocks by torch.func, the oracles of the K-FAC and Shampoo tests.

For a layer with homogeneous weight Wbar (d_g x d_a, flattened row-major so that a Kronecker
factorisation reads kron(G, A)), and z = f(Wbar) the model output on a batch:

* GGN block  = J^T Hess_z(L) J with J = dz/dvec(Wbar)   (= the Fisher block for the losses here)
* per-datum empirical Fisher block (m = 1) = grad l grad l^T
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from kfqn.layers import Conv2dAdapter, LinearAdapter


def adapter_of(module: nn.Module):
    return (LinearAdapter if isinstance(module, nn.Linear) else Conv2dAdapter)(module)


def output_fn(model: nn.Module, name: str, x: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """(f, Wbar0): the model output as a function of one layer's homogeneous weight."""
    module = dict(model.named_modules())[name]
    ad = adapter_of(module)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(wbar: Tensor) -> Tensor:
        parts = ad.split(wbar)
        p = dict(params)
        p[f"{name}.weight"] = parts[0]
        if len(parts) > 1:
            p[f"{name}.bias"] = parts[1]
        return functional_call(model, p, (x,))

    return f, ad.homogeneous_weight().detach().clone()


def ggn_block(model: nn.Module, name: str, x: Tensor, loss: Callable[[Tensor], Tensor]) -> Tensor:
    """J^T Hess_z(loss) J for one layer (loss: batch loss as a function of the output z)."""
    f, w0 = output_fn(model, name, x)
    z0 = f(w0).detach()
    jac = jacrev(f)(w0).reshape(z0.numel(), -1)
    hess = hessian(loss)(z0).reshape(z0.numel(), z0.numel())
    return jac.T @ hess @ jac


def loss_jacobian(model: nn.Module, name: str, x: Tensor,
                  loss: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """(J, z0): J = dz/dvec(Wbar) as (numel(z), d_g d_a)."""
    f, w0 = output_fn(model, name, x)
    z0 = f(w0).detach()
    return jacrev(f)(w0).reshape(z0.numel(), -1), z0


def gradient_outer(model: nn.Module, name: str, x: Tensor,
                   loss: Callable[[Tensor], Tensor]) -> Tensor:
    """grad_Wbar(l) grad_Wbar(l)^T with l = m * loss (the per-datum loss when m = 1)."""
    f, w0 = output_fn(model, name, x)
    g = jacrev(lambda w: loss(f(w)))(w0).reshape(-1) * x.shape[0]
    return torch.outer(g, g)
