"""CPU kernels under the model: oneDNN-packed inference products and the chunked linear cross-entropy.

ftplm.model uses them as ordinary layers (`Linear`) and functions (`linear_cross_entropy`); they change speed and
memory, never the result (tested against F.linear and autograd).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# Linear -> ((weight pointer, version), its oneDNN-packed copy). Kept off the module: an opaque packed tensor
# would break copy.deepcopy and pickling of the model.
_PACKED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, int], torch.Tensor]] = weakref.WeakKeyDictionary()


class Linear(nn.Linear):
    """nn.Linear whose CPU inference product runs through oneDNN with the weight packed once.

    F.linear in float32 goes to MKL, which on our AMD EPYC runs the few-row products of decoding on one thread (a
    decode step is then bound by one core streaming the weights) and larger ones well below peak. oneDNN with a
    prepacked weight (what torch.compile's CPU freezing uses) runs them on every thread. On our 2-core EPYC,
    2 threads, the 24 trunk matrices of `small`: 1 row 2.35 -> 0.78 ms, 4 rows 3.83 -> 0.76, 32 rows 6.32 -> 2.00,
    64 rows 9.94 -> 3.37. The packed copy is cached per module and repacked when the weight changes (an optimizer
    step, load_state_dict). Taken only where it is the same product: no autograd, no autocast, float32 on CPU, and
    weights too large to stay in cache (small ones are faster through F.linear). Training never takes it.
    """

    MIN_PACKED = 1 << 17  # weight elements (the FTP decoder's 256 x 256 matrices: F.linear is faster)
    PACK_ROWS = 32  # the row count oneDNN tunes the packed layout for; 1-64 rows all ran as fast (measured)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            self.training
            or torch.is_grad_enabled()
            or torch.is_autocast_enabled(x.device.type)
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or w.dtype != torch.float32
            or w.numel() < self.MIN_PACKED
            or not ONEDNN_LINEAR
        ):
            return F.linear(x, w, self.bias)
        key = weight_key(w)
        cached = _PACKED.get(self)
        if cached is None or cached[0] != key:
            cached = _PACKED[self] = key, pack_weight(w, self.PACK_ROWS)
        return packed_linear(x, cached[1], self.bias, self.out_features)


def weight_key(w: torch.Tensor) -> tuple[int, int]:
    """Identifies a weight's current values, for caches derived from it (inference tensors keep no version)."""
    return w.data_ptr(), -1 if w.is_inference() else w._version


def pack_weight(w: torch.Tensor, rows: int = Linear.PACK_ROWS) -> torch.Tensor:
    """A weight (out, in) reordered for oneDNN's CPU product (opaque: only packed_linear reads it)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """F.linear with a pack_weight weight (float32, or bfloat16 where the CPU has it)."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.size(-1)), packed, bias, "none", [], "")
    return y.view(*x.shape[:-1], out_features)


def inference_products(device: torch.device) -> str:
    """Which path Linear's large float32 inference products take on this device (recorded by benchmarks)."""
    return "oneDNN packed" if ONEDNN_LINEAR and device.type == "cpu" else "F.linear"


class LinearCrossEntropy(torch.autograd.Function):
    """Weighted cross-entropy of an LM head, computed in row chunks without materialising all logits.

    loss = sum_i coef_i * CE(hidden_i @ weight.T, target_i). Gradients are computed during the forward pass, one
    chunk at a time (the "fused linear cross-entropy" trick), so the (rows x vocab) logits never exist at once and no
    fp32 log-softmax over them is kept for backward: this is where FTP's N-fold output cost goes, so keep it lean.
    targets and coef may be (rows, K): K targets scored under each row's one softmax (sum_ik coef_ik CE_ik), for a
    loss where several tokens share a distribution (FTP's bag of future tokens). Targets of -1 must have coef 0.
    Also returns the CE per target (detached) for metrics. Weight rows from
    `classes` on (vocabulary padding) are no class: their logits are -inf, so they get no probability and no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, coef, want_argmax: bool = False, chunk_rows: int = 256, classes=None):
        need_grad = hidden.requires_grad or weight.requires_grad
        compute_dtype = (
            torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        )
        if hidden.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            compute_dtype = torch.get_autocast_dtype("cuda")
        h = hidden.detach().to(compute_dtype)
        w = weight.detach().to(compute_dtype)
        safe_targets = targets.clamp(min=0)
        acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # fp32, or fp64 in gradient checks
        ce = torch.empty(targets.shape, device=h.device, dtype=acc_dtype)
        grad_h = torch.empty_like(h) if need_grad else None
        grad_w = torch.zeros(weight.shape, device=h.device, dtype=acc_dtype) if need_grad else None
        argmax = torch.empty(h.size(0), device=h.device, dtype=torch.long) if want_argmax else None
        for start in range(0, h.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (h[rows] @ w.T).to(acc_dtype)
            if classes is not None and classes < logits.size(1):
                logits[:, classes:] = float("-inf")
            t = safe_targets[rows].view(logits.size(0), -1)  # (rows, K)
            target_logit = logits.gather(1, t)
            if argmax is not None:
                argmax[rows] = logits.argmax(dim=1)
            # in place, to keep the chunk in cache: logits -> exp(logits - max) -> softmax
            row_max = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(row_max).exp_()
            row_sum = probs.sum(dim=1, keepdim=True)
            ce[rows] = (row_max + row_sum.log() - target_logit).view(ce[rows].shape)
            if grad_h is not None and grad_w is not None:
                c = coef[rows].view(t.shape)
                probs.mul_(c.sum(1, keepdim=True) / row_sum)  # coef * softmax
                probs.scatter_add_(1, t, -c.to(probs.dtype))  # - coef * onehot
                g = probs.to(compute_dtype)
                grad_h[rows] = g @ w
                grad_w += g.T @ h[rows]
        ce = ce.masked_fill(targets < 0, 0.0)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.input_dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(ce)
        if argmax is None:
            return (ce * coef).sum(), ce
        ctx.mark_non_differentiable(argmax)
        return (ce * coef).sum(), ce, argmax

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grad_h, grad_w = ctx.saved_tensors
        grad_hidden = (grad_h * grad_loss).to(ctx.input_dtypes[0]) if grad_h is not None else None
        grad_weight = (grad_w * grad_loss).to(ctx.input_dtypes[1]) if grad_w is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None


# rows of logits per chunk: few on a CPU (a chunk's logits stay in cache), many on a GPU (256-row chunks meant 256
# Python iterations of small products per `base` FTP micro-batch; 8192 rows of a 50k vocabulary are 1.6 GB in fp32)
CHUNK_ROWS = {"cpu": 256, "cuda": 8192}


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    coef: torch.Tensor,
    want_argmax: bool = False,
    classes: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Weighted LM-head cross-entropy: (sum_i coef_i * CE_i, CE per target[, per-row argmax]) over the first
    `classes` rows of weight (all by default); targets (rows,) or (rows, K). See LinearCrossEntropy."""
    return LinearCrossEntropy.apply(
        hidden,
        weight,
        targets,
        coef.to(torch.promote_types(hidden.dtype, torch.float32)),
        want_argmax,
        CHUNK_ROWS.get(hidden.device.type, 256),
        classes,
    )
