"""Independent dense float64 reference of the K-BFGS family (docs/algorithms.md §3-4), written
from the algorithm specification (the P2 starts and skip rules of the authors' public code).

The reference never calls library code; only the driver ``compare_with_library`` at the end
imports kfqn, to run the optimizer under test side by side. A tiny network is described as a list of stages
(``RefLinear`` / ``RefConv`` / activations / flatten) with explicit weight tensors; the forward
pass is functional so that torch.autograd gives dL/dh for every pre-activation h. All statistics
(A, v, hbar, gbar, Mbar) are accumulated with explicit Python loops over samples i and output
positions t; conv patches come from an explicit loop im2col (checked against ``F.unfold``).

Readings of docs/algorithms.md taken here (see the tests' docstrings and the report):

* homogeneous layout Wbar = [W reshaped (d_g, d_a - 1), b], abar = [a; 1];
* g_{i,t} = m * dL/dh_{i,t} (L the mean-reduced, unregularised loss); hbar, gbar, v are means
  over samples and positions; A = (1/m) sum_i sum_t abar abar^T (sum over positions);
* momentum: Mhat_0 = 0 (``momentum_init='zero'``; 'first': Mhat = G at the first step), then
  Mhat <- rho Mhat + (1 - rho) G with G = Mbar + tau Wbar (weight decay inside, biases
  included); P = -H_g Mhat H_a;
* ``ema_hessian_action`` (kbfgs): warm start A0 = per-sample mean over the whole warm-start
  data, H_a = (A0 + sqrt(lambda) I)^{-1}; after every step k: (k > 0) A <- beta A + (1-beta)
  A_batch(theta_k); A_LM = A + sqrt(lambda) I; v = mean abar; s = H_a v; y = A_LM s; BFGS,
  skipped if s^T y <= 0 or (``a_norm_gate``) s^T y <= 1e-4 ||s||^2 ||v||; no damping;
* ``minibatch_hessian_action`` (kfbfgs_cnn): H_a = (A_batch0 + sqrt(lambda) I)^{-1} at step 0
  before the direction; after each step s = H_a v, y = A_batch s + sqrt(lambda) s, Powell
  (mu1 = 0.2) with the current H_a, BFGS;
* ``secant_pairs``: pair (hbar(theta) - hbar(theta+), gbar(theta) - gbar(theta+)); EMA 0.9
  started at zero (``ema_init='zero'``; 'first': started by the first pair; buffers hold
  undamped averages); damping (DD or DDV2; Powell fires on s^T y <= mu1 y^T H y and DD's second
  stage on s^T y <= mu2 s^T s, non-strict as in the authors' code) with the
  current H_g; optional norm gate s^T y <= eps ||s||^2 ||gbar(theta)||; BFGS or L-BFGS
  (gamma = 1, FIFO memory of accepted pairs). ``extra_pass``: theta+ is the new iterate on the
  same minibatch; ``next_iterate``: at step k >= 1 the pair (hbar_{k-1} - hbar_k,
  gbar_{k-1} - gbar_k) updates H_g before the direction of step k;
* lambda_A = mu2 = sqrt(lambda); with conv_split='sqrt_T' a conv layer with |T| > 1 positions
  takes lambda_A = sqrt(lambda |T|), mu2 = sqrt(lambda / |T|).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

DT = torch.float64


# -- inverse-Hessian representations --------------------------------------------------------------
def bfgs_inverse_update(H: Tensor, s: Tensor, y: Tensor) -> Tensor:
    """H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T (product form)."""
    rho = 1.0 / torch.dot(s, y)
    eye = torch.eye(H.shape[0], dtype=DT)
    left = eye - rho * torch.outer(s, y)
    return left @ H @ left.T + rho * torch.outer(s, s)


class DenseInverse:
    def __init__(self, H: Tensor) -> None:
        self.H = H.clone()

    def mv(self, v: Tensor) -> Tensor:
        return self.H @ v

    def left(self, M: Tensor) -> Tensor:  # H @ M
        return self.H @ M

    def update(self, s: Tensor, y: Tensor) -> None:
        self.H = bfgs_inverse_update(self.H, s, y)

    def dense(self) -> Tensor:
        return self.H.clone()


class LBFGSInverse:
    """Two-loop recursion, H0 = I (gamma = 1), FIFO memory of the p most recent accepted pairs."""

    def __init__(self, d: int, memory: int) -> None:
        self.d, self.memory = d, memory
        self.pairs: list[tuple[Tensor, Tensor]] = []

    def mv(self, v: Tensor) -> Tensor:
        q = v.clone()
        alphas = []
        for s, y in reversed(self.pairs):
            rho = 1.0 / torch.dot(s, y)
            alpha = rho * torch.dot(s, q)
            q = q - alpha * y
            alphas.append(alpha)
        r = q  # H0 = I
        for (s, y), alpha in zip(self.pairs, reversed(alphas)):
            rho = 1.0 / torch.dot(s, y)
            beta = rho * torch.dot(y, r)
            r = r + (alpha - beta) * s
        return r

    def left(self, M: Tensor) -> Tensor:
        return torch.stack([self.mv(M[:, j]) for j in range(M.shape[1])], dim=1)

    def update(self, s: Tensor, y: Tensor) -> None:
        self.pairs.append((s.clone(), y.clone()))
        if len(self.pairs) > self.memory:
            self.pairs.pop(0)

    def dense(self) -> Tensor:
        return self.left(torch.eye(self.d, dtype=DT))


# -- damping ---------------------------------------------------------------------------------------
def powell(s: Tensor, y: Tensor, Hy: Tensor, mu1: float, log: list, tag: str) -> Tensor:
    sy, yHy = torch.dot(s, y), torch.dot(y, Hy)
    if sy <= mu1 * yHy:
        theta = (1.0 - mu1) * yHy / (yHy - sy)
        s = theta * s + (1.0 - theta) * Hy
        log.append(f"{tag}:powell")
    return s


def damp(kind: str, s: Tensor, y: Tensor, Hinv, mu1: float, mu2: float, log: list,
         tag: str) -> tuple[Tensor, Tensor]:
    if kind == "none":
        return s, y
    s = powell(s, y, Hinv.mv(y), mu1, log, tag)
    if kind == "dd":
        sy, ss = torch.dot(s, y), torch.dot(s, s)
        if sy <= mu2 * ss:
            theta2 = (1.0 - mu2) * ss / (ss - sy)
            y = theta2 * y + (1.0 - theta2) * s
            log.append(f"{tag}:dd2")
    elif kind == "ddv2":
        y = y + mu2 * s
    elif kind != "powell":
        raise ValueError(kind)
    return s, y


# -- the tiny network --------------------------------------------------------------------------------
@dataclass
class RefLinear:
    W: Tensor
    b: Tensor
    kind: str = "linear"

    @property
    def d_g(self) -> int:
        return self.W.shape[0]


@dataclass
class RefConv:
    W: Tensor
    b: Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    kind: str = "conv"

    @property
    def d_g(self) -> int:
        return self.W.shape[0]


def from_module(module: torch.nn.Module):
    """Copy an nn.Linear / nn.Conv2d's parameters into a reference layer (float64 clones)."""
    W = module.weight.detach().to(DT).clone()
    b = module.bias.detach().to(DT).clone()
    if isinstance(module, torch.nn.Conv2d):
        assert module.groups == 1 and module.padding_mode == "zeros"
        return RefConv(W, b, tuple(module.stride), tuple(module.padding), tuple(module.dilation))
    return RefLinear(W, b)


def im2col(x: Tensor, kernel: tuple[int, int], stride, padding, dilation) -> Tensor:
    """(m, c, H, W) -> (m, T, c*kh*kw), column order (c, ki, kj), positions row-major."""
    m, c, H, W = x.shape
    kh, kw = kernel
    xp = torch.zeros(m, c, H + 2 * padding[0], W + 2 * padding[1], dtype=x.dtype)
    xp[:, :, padding[0]:padding[0] + H, padding[1]:padding[1] + W] = x
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = torch.zeros(m, Ho * Wo, c * kh * kw, dtype=x.dtype)
    for oh in range(Ho):
        for ow in range(Wo):
            t = oh * Wo + ow
            col = 0
            for ci in range(c):
                for ki in range(kh):
                    for kj in range(kw):
                        ih = oh * stride[0] + ki * dilation[0]
                        iw = ow * stride[1] + kj * dilation[1]
                        out[:, t, col] = xp[:, ci, ih, iw]
                        col += 1
    ref = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    assert torch.equal(out, ref), "explicit im2col disagrees with F.unfold"
    return out


def homogeneous(layer) -> Tensor:
    return torch.cat([layer.W.reshape(layer.d_g, -1), layer.b[:, None]], dim=1)


def set_homogeneous(layer, Wbar: Tensor) -> None:
    layer.W = Wbar[:, :-1].reshape(layer.W.shape).clone()
    layer.b = Wbar[:, -1].clone()


@dataclass
class Capture:
    """One layer's quantities from a forward/backward pass."""

    abar: Tensor   # (m, T, d_a)
    h: Tensor      # (m, T, d_g)
    dLdh: Tensor   # (m, T, d_g)
    grad_W: Tensor
    grad_b: Tensor


def capture(net: list, x: Tensor, target: Tensor, loss_kind: str) -> tuple[float, list[Capture]]:
    """Functional forward + autograd on explicit float64 weights."""
    params, hs, inputs = [], [], []
    a = x.to(DT)
    for stage in net:
        if isinstance(stage, (RefLinear, RefConv)):
            W = stage.W.clone().requires_grad_(True)
            b = stage.b.clone().requires_grad_(True)
            params += [W, b]
            inputs.append(a.detach())
            if stage.kind == "linear":
                h = a @ W.T + b
            else:
                h = F.conv2d(a, W, b, stride=stage.stride, padding=stage.padding,
                             dilation=stage.dilation)
            hs.append(h)
            a = h
        elif stage == "tanh":
            a = torch.tanh(a)
        elif stage == "relu":
            a = torch.relu(a)
        elif stage == "flatten":
            a = a.flatten(1)
        else:
            raise ValueError(stage)
    if loss_kind == "mse":
        loss = 0.5 * ((a - target.to(DT)) ** 2).sum(1).mean()
    elif loss_kind == "ce":
        loss = F.cross_entropy(a, target)
    elif loss_kind == "sigmoid_ce":  # P2 autoencoders: summed over pixels, mean over samples
        loss = F.binary_cross_entropy_with_logits(a, target.to(DT), reduction="sum") / a.shape[0]
    else:
        raise ValueError(loss_kind)
    grads = torch.autograd.grad(loss, hs + params)
    dh, dp = grads[:len(hs)], grads[len(hs):]
    caps = []
    layers = [s for s in net if isinstance(s, (RefLinear, RefConv))]
    for j, layer in enumerate(layers):
        inp, h, g = inputs[j], hs[j].detach(), dh[j]
        m = inp.shape[0]
        if layer.kind == "linear":
            u = inp[:, None, :]
            h, g = h[:, None, :], g[:, None, :]
        else:
            u = im2col(inp, tuple(layer.W.shape[2:]), layer.stride, layer.padding, layer.dilation)
            h = h.reshape(m, layer.d_g, -1).transpose(1, 2)
            g = g.reshape(m, layer.d_g, -1).transpose(1, 2)
        abar = torch.cat([u, torch.ones(*u.shape[:2], 1, dtype=DT)], dim=2)
        # sanity: the captured pre-activations are Wbar abar
        assert torch.allclose(abar @ homogeneous(layer).T, h, atol=1e-12, rtol=0)
        caps.append(Capture(abar, h, g, dp[2 * j], dp[2 * j + 1]))
    return float(loss.detach()), caps


@dataclass
class Stats:
    A: Tensor      # (1/m) sum_i sum_t abar abar^T
    v: Tensor      # mean over i, t of abar
    hbar: Tensor   # mean over i, t of h
    gbar: Tensor   # mean over i, t of g = m dL/dh
    Mbar: Tensor   # homogeneous gradient (d_g, d_a)


def statistics(cap: Capture) -> Stats:
    """Explicit loops over samples i and positions t."""
    m, T, d_a = cap.abar.shape
    d_g = cap.h.shape[2]
    A = torch.zeros(d_a, d_a, dtype=DT)
    v = torch.zeros(d_a, dtype=DT)
    hbar = torch.zeros(d_g, dtype=DT)
    gbar = torch.zeros(d_g, dtype=DT)
    Mbar = torch.zeros(d_g, d_a, dtype=DT)
    for i in range(m):
        for t in range(T):
            ab = cap.abar[i, t]
            g_it = m * cap.dLdh[i, t]          # per-sample gradient w.r.t. h_{i,t}
            A += torch.outer(ab, ab)
            v += ab
            hbar += cap.h[i, t]
            gbar += g_it
            Mbar += torch.outer(g_it, ab) / m  # dL/dWbar = (1/m) sum_i sum_t g_{i,t} abar^T
    A /= m
    v /= m * T
    hbar /= m * T
    gbar /= m * T
    # sanity: the loop gradient equals autograd's gradient w.r.t. W and b
    auto = torch.cat([cap.grad_W.reshape(d_g, -1), cap.grad_b[:, None]], dim=1)
    assert torch.allclose(Mbar, auto, atol=1e-12, rtol=0)
    return Stats(A, v, hbar, gbar, Mbar)


def hessian_action(cap: Capture, s: Tensor, lam_a: float) -> Tensor:
    """y = (1/m) sum_i sum_t abar (abar^T s) + lam_a s, by loops."""
    m, T, _ = cap.abar.shape
    y = torch.zeros_like(s)
    for i in range(m):
        for t in range(T):
            ab = cap.abar[i, t]
            y += ab * torch.dot(ab, s)
    return y / m + lam_a * s


# -- the optimizer -------------------------------------------------------------------------------------
@dataclass
class LayerState:
    layer: object
    H_a: DenseInverse | None = None
    A: Tensor | None = None
    H_g: object = None
    Mhat: Tensor | None = None
    s_avg: Tensor | None = None
    y_avg: Tensor | None = None
    prev: Stats | None = None
    cur: Stats | None = None
    cur_cap: Capture | None = None

    @property
    def T(self) -> int:
        return self.cur_cap.abar.shape[1]


@dataclass
class RefConfig:
    a_side: str = "ema_hessian_action"   # or "minibatch_hessian_action"
    g_damping: str = "dd"                # dd / ddv2 / powell / none
    norm_gate: bool = True
    norm_gate_eps: float = 1e-4
    source: str = "extra_pass"           # or "next_iterate"
    g_update: str = "bfgs"               # or "lbfgs"
    lbfgs_memory: int = 100
    a_damping: str = "none"              # minibatch side: "powell" or "none"
    lr: float = 0.3
    rho: float = 0.9
    beta: float = 0.9
    pair_ema: float = 0.9
    tau: float = 1e-3
    lam: float = 0.3
    mu1: float = 0.2
    conv_split: str = "sqrt"             # or "sqrt_T"
    momentum_init: str = "zero"          # or "first"
    ema_init: str = "zero"               # or "first"
    a_norm_gate: bool = True             # ema_hessian_action only
    a_norm_gate_eps: float = 1e-4


PRESETS = {
    "kbfgs": dict(),
    "kbfgs_l": dict(g_update="lbfgs"),
    "kfbfgs_cnn": dict(a_side="minibatch_hessian_action", g_damping="ddv2", norm_gate=False,
                       a_damping="powell"),
    "kfbfgs_l_cnn": dict(a_side="minibatch_hessian_action", g_damping="ddv2", norm_gate=False,
                         a_damping="powell", g_update="lbfgs"),
}


@dataclass
class ReferenceKBFGS:
    net: list
    cfg: RefConfig
    loss_kind: str
    log: list = field(default_factory=list)
    step_count: int = 0

    def __post_init__(self) -> None:
        self.states = [LayerState(s) for s in self.net if isinstance(s, (RefLinear, RefConv))]
        self.initial_params = [p.clone() for p in self.params()]
        for st in self.states:
            d_g = st.layer.d_g
            st.H_g = (DenseInverse(torch.eye(d_g, dtype=DT)) if self.cfg.g_update == "bfgs"
                      else LBFGSInverse(d_g, self.cfg.lbfgs_memory))

    def lam_a(self, T: int) -> float:
        """lambda_A of a layer with T output positions (docs/algorithms.md §2 conv_damping_split)."""
        if T > 1 and self.cfg.conv_split == "sqrt_T":
            return math.sqrt(self.cfg.lam * T)
        return math.sqrt(self.cfg.lam)

    def mu2(self, T: int) -> float:
        if T > 1 and self.cfg.conv_split == "sqrt_T":
            return math.sqrt(self.cfg.lam / T)
        return math.sqrt(self.cfg.lam)

    def warm_start(self, batches: list[Tensor]) -> None:
        """A0 = (1/N) sum over every warm-start sample of sum_t abar abar^T."""
        n = 0
        sums = [None] * len(self.states)
        positions = [1] * len(self.states)
        for xb in batches:
            dummy = torch.zeros(xb.shape[0], dtype=torch.long) if self.loss_kind == "ce" else \
                torch.zeros(xb.shape[0], self.net[-1].d_g, dtype=DT)  # the loss is not used
            _, caps = capture(self.net, xb, dummy, self.loss_kind)
            m = xb.shape[0]
            for j, cap in enumerate(caps):
                positions[j] = cap.abar.shape[1]
                st = statistics(cap)
                sums[j] = st.A * m if sums[j] is None else sums[j] + st.A * m
            n += m
        for j, st in enumerate(self.states):
            st.A = sums[j] / n
            eye = torch.eye(st.A.shape[0], dtype=DT)
            st.H_a = DenseInverse(torch.linalg.inv(st.A + self.lam_a(positions[j]) * eye))

    # G side
    def _g_pair(self, st: LayerState, s: Tensor, y: Tensor, g_ref: Tensor, tag: str) -> None:
        c = self.cfg
        if st.s_avg is None and c.ema_init == "first":
            st.s_avg, st.y_avg = s.clone(), y.clone()
        else:
            if st.s_avg is None:
                st.s_avg, st.y_avg = torch.zeros_like(s), torch.zeros_like(y)
            st.s_avg = c.pair_ema * st.s_avg + (1 - c.pair_ema) * s
            st.y_avg = c.pair_ema * st.y_avg + (1 - c.pair_ema) * y
        sd, yd = damp(c.g_damping, st.s_avg, st.y_avg, st.H_g, c.mu1, self.mu2(st.T), self.log,
                      tag)
        sy = torch.dot(sd, yd)
        if sy <= 0:
            self.log.append(f"{tag}:skip_nonpos")
            return
        if c.norm_gate and sy <= c.norm_gate_eps * torch.dot(sd, sd) * torch.linalg.norm(g_ref):
            self.log.append(f"{tag}:skip_gate")
            return
        st.H_g.update(sd, yd)

    def step(self, x: Tensor, target: Tensor) -> float:
        c, k = self.cfg, self.step_count
        loss, caps = capture(self.net, x, target, self.loss_kind)
        for j, st in enumerate(self.states):
            st.prev, st.cur, st.cur_cap = st.cur, statistics(caps[j]), caps[j]
            tag = f"step{k}/layer{j}"
            if c.source == "next_iterate" and k >= 1:
                self._g_pair(st, st.prev.hbar - st.cur.hbar, st.prev.gbar - st.cur.gbar,
                             st.prev.gbar, tag + "/g")
            if c.a_side == "minibatch_hessian_action" and k == 0:
                eye = torch.eye(st.cur.A.shape[0], dtype=DT)
                st.H_a = DenseInverse(torch.linalg.inv(st.cur.A + self.lam_a(st.T) * eye))
            assert st.H_a is not None, "warm_start() first"
        # direction and parameter update
        for st in self.states:
            Wbar = homogeneous(st.layer)
            G = st.cur.Mbar + c.tau * Wbar
            if st.Mhat is None and c.momentum_init == "first":
                st.Mhat = G.clone()
            else:
                if st.Mhat is None:
                    st.Mhat = torch.zeros_like(G)
                st.Mhat = c.rho * st.Mhat + (1 - c.rho) * G
            P = -(st.H_g.left(st.Mhat) @ st.H_a.H)
            set_homogeneous(st.layer, Wbar + c.lr * P)
        # A side after the step
        for j, st in enumerate(self.states):
            tag = f"step{k}/layer{j}/a"
            H_a = st.H_a
            if c.a_side == "ema_hessian_action":
                if k > 0:
                    st.A = c.beta * st.A + (1 - c.beta) * st.cur.A
                A_LM = st.A + self.lam_a(st.T) * torch.eye(st.A.shape[0], dtype=DT)
                s_a = H_a.mv(st.cur.v)
                y_a = A_LM @ s_a
                sy_a = torch.dot(s_a, y_a)
                if c.a_norm_gate and 0 < sy_a <= (c.a_norm_gate_eps * torch.dot(s_a, s_a)
                                                  * torch.linalg.norm(st.cur.v)):
                    self.log.append(f"{tag}:skip_gate")
                    continue
            else:
                s_a = H_a.mv(st.cur.v)
                y_a = hessian_action(st.cur_cap, s_a, self.lam_a(st.T))
                if c.a_damping == "powell":
                    s_a = powell(s_a, y_a, H_a.mv(y_a), c.mu1, self.log, tag)
            if torch.dot(s_a, y_a) > 0:
                H_a.update(s_a, y_a)
            else:
                self.log.append(f"{tag}:skip_nonpos")
        # G side: extra pass on the same minibatch at theta+
        if c.source == "extra_pass":
            _, trial = capture(self.net, x, target, self.loss_kind)
            for j, st in enumerate(self.states):
                plus = statistics(trial[j])
                self._g_pair(st, st.cur.hbar - plus.hbar, st.cur.gbar - plus.gbar, st.cur.gbar,
                             f"step{k}/layer{j}/g")
        self.step_count += 1
        return loss

    # read-outs
    def params(self) -> list[Tensor]:
        out = []
        for st in self.states:
            out += [st.layer.W, st.layer.b]
        return out

    def factors(self) -> list[dict[str, Tensor]]:
        out = []
        for st in self.states:
            f = {"H_a": st.H_a.dense(), "H_g": st.H_g.dense()}
            if st.A is not None:
                f["A"] = st.A.clone()
            out.append(f)
        return out


def reference_net(model: torch.nn.Sequential) -> list:
    """Reference stages mirroring an nn.Sequential of Linear/Conv2d/Tanh/ReLU/Flatten."""
    net = []
    for mod in model:
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            net.append(from_module(mod))
        elif isinstance(mod, torch.nn.Tanh):
            net.append("tanh")
        elif isinstance(mod, torch.nn.ReLU):
            net.append("relu")
        elif isinstance(mod, torch.nn.Flatten):
            net.append("flatten")
        else:
            raise TypeError(type(mod))
    return net


# -- driver: the library optimizer and the reference side by side --------------------------------------
def compare_with_library(model: torch.nn.Sequential, preset: str, data: list, loss_kind: str, *,
                         warm: list | None = None, cfg_overrides: dict | None = None,
                         lib_kwargs: dict | None = None, dotlist: list | None = None,
                         lr: float = 0.3, lam: float = 0.3, tau: float = 1e-3):
    """Run ``len(data)`` steps of the library preset and of the reference on the same batches.

    Returns (diffs, scales, ref): diffs[quantity] = list over steps of the max abs difference,
    scales[quantity] = list over steps of the max abs value of the reference's quantity;
    quantities 'params', 'H_a', 'H_g', 'A' (where both keep A), 'loss'.
    """
    import kfqn  # only the driver touches the library

    model = model.double()
    ref_cfg = RefConfig(lr=lr, lam=lam, tau=tau, **{**PRESETS[preset], **(cfg_overrides or {})})
    ref = ReferenceKBFGS(reference_net(model), ref_cfg, loss_kind)
    opt = kfqn.build_optimizer(model, preset, lr=lr, damping=lam, weight_decay=tau,
                               factor_dtype="float64", dotlist=dotlist, **(lib_kwargs or {}))
    if warm is not None:
        with opt.warm_start():
            for xb in warm:
                model(xb)
        ref.warm_start(warm)

    def loss_fn(out, yb):
        if loss_kind == "mse":
            return 0.5 * ((out - yb) ** 2).sum(1).mean()
        if loss_kind == "sigmoid_ce":
            return F.binary_cross_entropy_with_logits(out, yb, reduction="sum") / out.shape[0]
        return F.cross_entropy(out, yb)

    layer_names = [n for n, mod in model.named_modules()
                   if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]
    assert list(opt.factors()) == layer_names
    diffs: dict[str, list[float]] = {"params": [], "H_a": [], "H_g": [], "A": [], "loss": []}
    scales: dict[str, list[float]] = {k: [] for k in diffs}
    for xb, yb in data:
        calls = []

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            calls.append(float(loss))
            return loss

        lib_loss = float(opt.step(closure))
        ref_loss = ref.step(xb, yb)
        want_calls = 2 if ref_cfg.source == "extra_pass" else 1
        assert len(calls) == want_calls, f"closure called {len(calls)} times"
        diffs["loss"].append(abs(lib_loss - ref_loss))
        scales["loss"].append(abs(ref_loss))
        lib_params = [p for mod in model.modules()
                      if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))
                      for p in (mod.weight, mod.bias)]
        diffs["params"].append(max(float((p.detach() - q).abs().max())
                                   for p, q in zip(lib_params, ref.params())))
        scales["params"].append(max(float(q.abs().max()) for q in ref.params()))
        lib_f = opt.factors()
        for key in ("H_a", "H_g", "A"):
            pairs = [(lib_f[n][key], rf[key]) for n, rf in zip(layer_names, ref.factors())
                     if key in rf and key in lib_f[n]]
            if pairs:
                diffs[key].append(max(float((a.to(DT) - b).abs().max()) for a, b in pairs))
                scales[key].append(max(float(b.abs().max()) for _, b in pairs))
    keep = [k for k, v in diffs.items() if v]
    return {k: diffs[k] for k in keep}, {k: scales[k] for k in keep}, ref
