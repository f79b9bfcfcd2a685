"""The fast engine: the same training as the plain loop, faster on CPU (see :mod:`helpers.nas`).

One-layer children with at most ``NCMAX`` classes run a hand-written step in the C kernels
(forward with the head's logits, cross-entropy, backward, the head's weight gradient and Adam; no
autograd). Other children use autograd over the first-layer kernel (when available) and PyTorch
ops in channels_last, the head with its weights in (h, w, c) order (a permutation of the plain
child's (c, h, w) weights: exact). Without the kernels every layer uses PyTorch ops.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ...models.nas_child import NASChild, apply_dropout, feature_sides
from ..child_data import ChildData, autocast
from ..dropout import DropoutStream
from .kernels import KERNEL_SIZES, NCMAX, Kernels, check_contiguous, ptr

__all__ = ["to_blocked", "from_blocked", "FusedFirstLayer", "KernelAdam", "FastChild", "train_fast"]


def to_blocked(x: torch.Tensor) -> torch.Tensor:
    """(N, S2, S2, F) -> (NB, N, S2*S2, 16), channels zero-padded to NB*16 (the kernels' layout)."""
    n, s2, _, f = x.shape
    nb = (f + 15) // 16
    if nb * 16 != f:
        x = F.pad(x, (0, nb * 16 - f))
    return x.reshape(n, s2 * s2, nb, 16).permute(2, 0, 1, 3).contiguous()


def from_blocked(xb: torch.Tensor, f: int, s2: int) -> torch.Tensor:
    """(NB, N, S2*S2, 16) -> (N, S2, S2, F) (a copy)."""
    nb, n = xb.shape[:2]
    return xb.permute(1, 2, 0, 3).reshape(n, s2, s2, nb * 16)[..., :f].contiguous()


class FusedFirstLayer(torch.autograd.Function):
    """Layer 1 through the C kernels (children with more layers): activations (N, S2, S2, F), NHWC."""

    @staticmethod
    def forward(ctx, w_t, b, st, ctr, p):
        n, f, s2 = len(st["idx"]), w_t.shape[1], st["s2"]
        nb = (f + 15) // 16
        out = torch.empty(nb, n, s2 * s2, 16)
        code = torch.empty(nb, n, s2 * s2, 16, dtype=torch.uint8)
        st["kernels"].forward(st, w_t, b, ctr, p, out, code)
        ctx.st, ctx.p, ctx.f = st, p, f
        ctx.save_for_backward(code)
        return from_blocked(out, f, s2)

    @staticmethod
    def backward(ctx, d_out):
        (code,) = ctx.saved_tensors
        st, f = ctx.st, ctx.f
        dw_parts = torch.zeros(2, st["cin"] * st["k"] ** 2, f)
        db_parts = torch.zeros(2, f)
        st["kernels"].backward(st, to_blocked(d_out), None, None, code, ctx.p, dw_parts, db_parts)
        return dw_parts[0] + dw_parts[1], db_parts[0] + db_parts[1], None, None, None


class KernelAdam:
    """``torch.optim.Adam`` (betas 0.9, 0.999, eps 1e-8, no weight decay) in the C library."""

    def __init__(self, params, lr: float, lib, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.lib, (self.b1, self.b2), self.eps = float(lr), lib, betas, float(eps)
        self.state = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for p in params}
        self.t = 0

    def step(self, items) -> None:
        """``items``: (param, grad, second grad part or None), the gradient being their sum."""
        self.t += 1
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        step_size, bc2_sqrt = self.lr / bc1, math.sqrt(bc2)
        for p, g0, g1 in items:
            m, v = self.state[id(p)]
            check_contiguous(p, g0, g1, m, v)
            self.lib.nas_adam(p.data_ptr(), g0.data_ptr(), ptr(g1), m.data_ptr(), v.data_ptr(), p.numel(),
                              self.b1, self.b2, self.eps, step_size, bc2_sqrt)


class FastChild:
    """A child's parameters in the fast engine's layouts, its training step and its logits.

    One-layer children with at most ``NCMAX`` classes run a hand-written step: the forward kernel
    also accumulates the head's logits, the backward kernel takes the logits' gradient and the head
    weights directly; loss, the head's weight gradient and Adam are C loops too (no autograd).
    Other children use autograd over the first-layer kernel (when available) and PyTorch ops.
    """

    def __init__(self, arch, seed, cfg, data: ChildData, kernels: Kernels | None):
        ref = NASChild(arch, cfg["in_chans"], cfg["num_classes"], cfg["image_size"], seed=seed)
        self.arch, self.cfg, self.data = ref.arch, cfg, data
        usable = cfg["precision"] == "fp32" and data.device.type == "cpu" and ref.arch[0]["kernel"] in KERNEL_SIZES
        self.kernels = kernels if usable else None
        self.stream = DropoutStream(seed)
        self.sides = feature_sides(self.arch, cfg["image_size"])
        self.nc = cfg["num_classes"]
        self.fused = self.kernels is not None and len(self.arch) == 1 and self.nc <= NCMAX
        dev = data.device
        self.conv_w, self.conv_b = [], []
        for i, conv in enumerate(m for m in ref.features if isinstance(m, nn.Conv2d)):
            w = conv.weight.detach().to(dev)
            if i == 0 and self.kernels is not None:
                w = w.permute(1, 2, 3, 0).reshape(-1, w.shape[0]).contiguous()        # (cin*k*k, f)
            else:
                w = w.clone(memory_format=torch.channels_last)
            self.conv_w.append(w.clone(memory_format=torch.preserve_format).requires_grad_())
            self.conv_b.append(conv.bias.detach().to(dev).clone().requires_grad_())
        f_last, s_last = self.arch[-1]["filters"], self.sides[-1]
        hw = ref.head.weight.detach().to(dev).view(self.nc, f_last, s_last, s_last).permute(0, 2, 3, 1)
        if self.fused:   # (NB, nc, Q, 16): the kernels' blocked layout, padded channels stay 0
            self.head_w = to_blocked(hw).requires_grad_()
        else:            # (nc, h*w*c)
            self.head_w = hw.reshape(self.nc, -1).contiguous().requires_grad_()
        self.head_b = ref.head.bias.detach().to(dev).clone().requires_grad_()
        self.params = [t for pair in zip(self.conv_w, self.conv_b) for t in pair] + [self.head_w, self.head_b]
        self.r = self.arch[0]["kernel"] // 2
        self.adam = KernelAdam(self.params, cfg["lr"], self.kernels.lib) if self.fused else None

    def _geometry(self, idx: torch.Tensor, split: str) -> dict:
        r, k = self.r, self.arch[0]["kernel"]
        return {"kernels": self.kernels, "xpad": self.data.padded(split, r), "idx": idx,
                "cin": self.cfg["in_chans"], "P": self.sides[0] + 2 * r, "off": 0, "k": k,
                "s2": self.sides[1], "key": self.stream.key}

    # -- one-layer children: hand-written step -------------------------------------------------
    def _fused_buffers(self, n: int) -> dict:
        """Per-step arrays of a one-layer child, allocated once per batch size."""
        if getattr(self, "_buf_n", None) != n:
            f, q, nc = self.arch[0]["filters"], self.sides[1] ** 2, self.nc
            nb = (f + 15) // 16
            self._buf = {"acts": torch.empty(nb, n, q * 16), "code": torch.empty(nb, n, q * 16, dtype=torch.uint8),
                         "logits": torch.empty(n, nc), "dl": torch.empty(n, nc), "dhb": torch.empty(nc),
                         "dw": torch.empty(2, self.conv_w[0].shape[0], f), "db": torch.empty(2, f),
                         "dhw": torch.empty(self.head_w.shape)}
            self._buf_n = n
        return self._buf

    def _fused_step(self, idx: torch.Tensor, y: torch.Tensor) -> float:
        """Forward, loss, backward and Adam of a one-layer child on one batch; returns the loss."""
        kern, lib, st = self.kernels, self.kernels.lib, self._geometry(idx, "train")
        n, f, p = len(idx), self.arch[0]["filters"], self.arch[0]["dropout"]
        q, nc = self.sides[1] ** 2, self.nc
        nb = (f + 15) // 16
        buf = self._fused_buffers(n)
        acts, code, logits, dl, dhw = buf["acts"], buf["code"], buf["logits"], buf["dl"], buf["dhw"]
        ctr = self.stream.take(n * q * f) if p > 0 else 0
        y = y.contiguous()
        with torch.no_grad():
            logits.zero_()
            kern.forward(st, self.conv_w[0], self.conv_b[0], ctr, p, acts, code, self.head_w, logits)
            check_contiguous(y, dl, buf["dhb"], self.head_b)
            loss = lib.nas_cross_entropy(logits.data_ptr(), self.head_b.data_ptr(), y.data_ptr(), n, nc,
                                         dl.data_ptr(), buf["dhb"].data_ptr())
            buf["dw"].zero_()
            buf["db"].zero_()
            # the head's weight gradient (nc, N) @ (N, Q*16) per channel block, in C beside the two
            # halves of the backward kernel: halves of the blocks, or of the columns for one block
            qj = q * 16
            if nb > 1:
                parts = ((0, nb // 2, 0, qj), (nb // 2, nb, 0, qj))
            else:
                parts = ((0, 1, 0, (q // 2) * 16), (0, 1, (q // 2) * 16, qj))

            def half(h):
                a, e = (0, n // 2) if h == 0 else (n // 2, n)
                kern.bwd(*kern.bwd_args(h, a, e, st, None, dl, self.head_w, code, p, buf["dw"], buf["db"]))
                lib.nas_head_grad(dl.data_ptr(), acts.data_ptr(), n, nc, qj, *parts[h], dhw.data_ptr())

            check_contiguous(st["xpad"], idx, self.head_w, code, acts, dhw)
            kern.parallel2(lambda: half(0), lambda: half(1))
            self.adam.step([(self.conv_w[0], buf["dw"][0], buf["dw"][1]), (self.conv_b[0], buf["db"][0], buf["db"][1]),
                            (self.head_w, dhw, None), (self.head_b, buf["dhb"], None)])
        return loss

    # -- general children: autograd ----------------------------------------------------------
    def forward(self, idx: torch.Tensor, split: str, train: bool) -> torch.Tensor:
        """Logits of the images ``idx`` of ``split`` (train: with dropout)."""
        data, n = self.data, len(idx)
        if self.fused:   # logits only (no autograd): scoring, or a look at a training batch
            layer = self.arch[0]
            draw = train and layer["dropout"] > 0
            ctr = self.stream.take(n * self.sides[1] ** 2 * layer["filters"]) if draw else 0
            logits = torch.zeros(n, self.nc)
            with torch.no_grad():
                self.kernels.forward(self._geometry(idx, split), self.conv_w[0], self.conv_b[0], ctr,
                                     layer["dropout"] if draw else 0.0, None, None, self.head_w, logits)
            return logits + self.head_b.detach()
        x = None
        for i, layer in enumerate(self.arch):
            f, k, p = layer["filters"], layer["kernel"], layer["dropout"]
            s2 = self.sides[i + 1]
            draw = train and p > 0
            if i == 0 and self.kernels is not None:
                ctr = self.stream.take(n * s2 * s2 * f) if draw else 0
                x = FusedFirstLayer.apply(self.conv_w[0], self.conv_b[0], self._geometry(idx, split), ctr,
                                           p if draw else 0.0)                    # (N, s2, s2, f)
                x = x.permute(0, 3, 1, 2)                                          # NCHW view, CL memory
                continue
            if i == 0:
                x = data.normalised(split)[idx].contiguous(memory_format=torch.channels_last)
            x = F.conv2d(x, self.conv_w[i], self.conv_b[i], padding=k // 2)
            x = F.relu(F.max_pool2d(x, 2))
            if draw:
                u = self.stream.int16(n * s2 * s2 * f, x.device).view(n, s2, s2, f).permute(0, 3, 1, 2)
                x = apply_dropout(x, u, p)
        feats = x.permute(0, 2, 3, 1).reshape(n, -1)          # (h, w, c) order
        return F.linear(feats, self.head_w, self.head_b)

    def train_step(self, idx: torch.Tensor, y: torch.Tensor, opt) -> float | torch.Tensor:
        if self.fused:
            return self._fused_step(idx, y)
        with autocast(self.cfg["precision"], self.data.device):
            loss = F.cross_entropy(self.forward(idx, "train", True), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()


def train_fast(arch, seed, data: ChildData, cfg: dict, kernels: Kernels | None) -> dict:
    device = data.device
    child = FastChild(arch, seed, cfg, data, kernels)
    opt = None if child.fused else torch.optim.Adam(child.params, lr=cfg["lr"],
                                                    fused=True if device.type in ("cpu", "cuda") else None)
    bs = cfg["batch_size"]
    steps = data.n_train // bs
    epoch_losses = []
    labels = data.train_labels
    t0 = time.perf_counter()
    for order in data.epoch_orders(cfg["data_seed"], cfg["epochs"]):
        order = order.to(device)
        losses = []
        for s in range(steps):
            idx = order[s * bs:(s + 1) * bs]
            losses.append(child.train_step(idx, labels[idx], opt))
        epoch_losses.append(float(sum(float(x) for x in losses)) / max(steps, 1))
    t1 = time.perf_counter()
    correct = 0
    chunk = data.n_val if child.fused else max(bs, 1024)
    with torch.no_grad(), autocast(cfg["precision"], device):
        for start in range(0, data.n_val, chunk):
            idx = torch.arange(start, min(start + chunk, data.n_val), device=device)
            correct += int((child.forward(idx, "val", False).argmax(1) == data.val_labels[idx]).sum())
    path = "fast: C kernels, fused step" if child.fused else \
        "fast: C kernels, first layer" if child.kernels is not None else "fast: PyTorch ops (fallback)"
    return {"val_acc": correct / data.n_val, "val_correct": correct, "epoch_losses": epoch_losses,
            "fit_s": t1 - t0, "eval_s": time.perf_counter() - t1, "engine_path": path}
