"""The language-model loss without the full logits: the LM head's projection and the cross-entropy,
computed a chunk of positions at a time.

With GPT-2's 50,257-token vocabulary the float32 logits of a batch (B x T x 50,257: 823 MB for
4 x 1024 positions) and their gradient dominate a small model's training memory. ``lm_loss`` never
holds more than one chunk's: in the forward pass each chunk's logits give its loss and, when
gradients are wanted, at once its gradients with respect to the hidden states and the head's
weight (as Liger-Kernel's fused linear cross-entropy does), so the backward pass only scales them
and nothing is computed twice. The result equals ``F.cross_entropy(hidden @ weight.T, targets,
reduction="sum")`` in value and gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -100  # a position not trained on (PyTorch's and Hugging Face's ignore_index)
# How the loss is cut on each kind of device: logits per chunk and the multiple the head's rows are
# padded to for its products. A CPU: 2**23 logits (32 MB in float32, 166 positions of a 50,257
# vocabulary), no padding. A GPU: 16 times the logits (each chunk writes a whole float32 gradient of
# the head's weight and launches a dozen kernels: 99 chunks of a 16 x 1024 batch took a third of a
# 124M step on an H200) and rows padded with zeros to a multiple of 64, since cuBLAS runs
# products with 50,257 rows on its old kernels at a fifth of the speed (nanoGPT pads the vocabulary
# to 50,304 for the same reason; the padding here leaves the model's shape alone).
CHUNKING = {"cpu": (2**23, 1)}
GPU_CHUNKING = (2**27, 64)


def lm_loss(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """The summed cross-entropy of ``targets`` (..., ``IGNORE`` where not trained) under the logits
    ``hidden @ weight.T`` (hidden: (..., C), weight: (vocab, C)), as a float32 scalar. Under
    autocast the products run in its dtype, as ``nn.Linear`` would; the softmax is float32."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    logits_per_chunk, pad_to = CHUNKING.get(device, GPU_CHUNKING)
    rows = max(1, logits_per_chunk // weight.shape[0])
    with torch.autocast(device, enabled=False):
        return _ChunkedLoss.apply(hidden, weight, targets, dtype, rows, pad_to)


def _padded(weight: Tensor, dtype: torch.dtype, pad_to: int) -> Tensor:
    """``weight`` in ``dtype`` with zero rows added up to a multiple of ``pad_to`` (one copy at most)."""
    vocab, width = weight.shape
    if vocab % pad_to == 0:
        return weight.to(dtype)
    w = weight.new_zeros((vocab + (-vocab) % pad_to, width), dtype=dtype)
    w[:vocab] = weight
    return w


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, dtype: torch.dtype, rows: int,
                pad_to: int) -> Tensor:
        h = hidden.reshape(-1, hidden.shape[-1])
        t = targets.reshape(-1)
        vocab = weight.shape[0]
        w = _padded(weight, dtype, pad_to)  # the padding's logits are left out, its gradients dropped
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], rows):
            h_chunk, t_chunk = h[start:start + rows].to(dtype), t[start:start + rows]
            padded_logits = (h_chunk @ w.T).float()
            logits = padded_logits[:, :vocab]
            trained = t_chunk != IGNORE
            picked = t_chunk.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, picked[:, None]).squeeze(1)
            total += torch.where(trained, lse - target_logit, 0.0).sum()
            if not grads:
                continue
            # d loss / d logits = softmax - one_hot(target), zero where not trained; the padding's
            # columns meet zero rows of w in grad_h and give grad_w rows that are dropped
            g = padded_logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(picked), device=g.device), picked] -= 1.0
            g = g.mul_(trained[:, None]).to(dtype)
            if grad_h is not None:
                grad_h[start:start + rows] = g @ w
            if grad_w is not None:
                grad_w += (g.T @ h_chunk)[:vocab].float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.shapes = hidden.shape, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        hidden_shape, weight_dtype = ctx.shapes
        dh = None if grad_h is None else (grad_h * grad_total).reshape(hidden_shape)
        dw = None if grad_w is None else (grad_w * grad_total).to(weight_dtype)
        return dh, dw, None, None, None, None
