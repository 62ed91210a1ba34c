"""The language-model loss without the full logits: the LM head's projection and the cross-entropy,
computed a chunk of positions at a time.

With GPT-2's 50,257-token vocabulary the float32 logits of a batch (B x T x 50,257: 823 MB for
4 x 1024 positions) and their gradient dominate a small model's training memory. ``lm_loss`` never
holds more than one chunk's: in the forward pass each chunk's logits give its loss and, when
gradients are wanted, at once its gradients with respect to the hidden states and the head's
weight (as Liger-Kernel's fused linear cross-entropy does), so the backward pass only scales them
and nothing is computed twice. The result equals ``F.cross_entropy(hidden @ weight.T, targets,
reduction="sum")`` in value and gradients.

``distillation_loss`` is knowledge distillation's loss, cut the same way: the student's and a
teacher's logits a chunk at a time, from their final hidden states and LM heads (``SoftTargets``).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def lm_loss(hidden: Tensor, weight: Tensor, targets: Tensor | SoftTargets) -> Tensor:
    """The summed cross-entropy of ``targets`` (..., ``IGNORE`` where not trained) under the logits
    ``hidden @ weight.T`` (hidden: (..., C), weight: (vocab, C)), as a float32 scalar. Under
    autocast the products run in its dtype, as ``nn.Linear`` would; the softmax is float32.
    ``SoftTargets`` (a teacher's) instead: the distillation loss, ``distillation_loss``'s first part,
    its two parts set on them."""
    if isinstance(targets, SoftTargets):
        loss, targets.soft, targets.hard = distillation_loss(hidden, weight, targets)
        return loss
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


# ---------------------------------------------------------------------------------------------
# Distillation


@dataclass
class SoftTargets:
    """What a student learns from a teacher in knowledge distillation (Hinton et al. 2015, as
    DistilGPT-2 was trained: Sanh et al. 2019): the teacher's next-token distribution at each position,
    softened by ``temperature``, beside the data's own next tokens. Given to ``lm_loss`` (or the
    model's forward) in place of the targets, it makes the loss ``distillation_loss``'s.

    The teacher's distribution is given as its final hidden states and its LM head, so that its
    logits too are made a chunk of positions at a time; they are constants (no gradient reaches
    them). The loss sets ``soft`` and ``hard`` to its two parts (summed, without gradient), for the log.
    """

    targets: Tensor  # (...) the data's next tokens, IGNORE where not trained (no soft loss there either)
    teacher_hidden: Tensor  # (..., C') the teacher's final LayerNorm output at the same positions
    teacher_weight: Tensor  # (vocab, C') the teacher's LM head
    temperature: float = 2.0
    soft_weight: float = 1.0  # the loss is w * soft + (1 - w) * hard
    soft: Tensor | None = None
    hard: Tensor | None = None


def distillation_loss(hidden: Tensor, weight: Tensor, soft: SoftTargets) -> tuple[Tensor, Tensor, Tensor]:
    """The distillation loss of the student whose logits are ``hidden @ weight.T``, summed over the
    trained positions (those whose ``soft.targets`` is not ``IGNORE``), and its two parts:

    - soft: ``T**2 * KL(softmax(u / T) || softmax(z / T))``, u the teacher's logits, z the student's
      (the T**2 keeps its gradients' scale independent of T, as Hinton et al.);
    - hard: the cross-entropy of the data's targets under ``softmax(z)``, as ``lm_loss``;

    as ``(w * soft + (1 - w) * hard, soft, hard)``, w = ``soft.soft_weight``; only the first has
    gradients (with respect to ``hidden`` and ``weight``). The softmaxes run in float32 (float64 for
    float64 inputs), the products as ``lm_loss``'s: in the autocast dtype under autocast."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    logits_per_chunk, pad_to = CHUNKING.get(device, GPU_CHUNKING)
    # A chunk holds about four times lm_loss's temporaries (two sets of logits, two softmaxes): a
    # quarter of its rows keeps the memory the same.
    rows = max(1, logits_per_chunk // (4 * weight.shape[0]))
    with torch.autocast(device, enabled=False):
        return _ChunkedDistillation.apply(hidden, weight, soft.teacher_hidden.detach(),
                                          soft.teacher_weight.detach(), soft.targets, float(soft.temperature),
                                          float(soft.soft_weight), dtype, rows, pad_to)


def _distillation_chunk(padded_logits: Tensor, teacher_logits: Tensor, targets: Tensor, vocab: int,
                        temperature: float, soft_weight: float, grads: bool) -> tuple[Tensor, Tensor | None]:
    """One chunk's summed soft and hard losses (as ``distillation_loss``), and, for ``grads``, the
    loss's gradient with respect to the logits written over ``padded_logits`` (zero in the padding's
    columns and at positions not trained)."""
    logits, t = padded_logits[:, :vocab], temperature
    trained = targets != IGNORE
    picked = targets.clamp(min=0)
    log_p = torch.log_softmax(logits / t, dim=-1)  # the student's softened distribution
    log_q = torch.log_softmax(teacher_logits[:, :vocab] / t, dim=-1)  # the teacher's
    q = log_q.exp()
    kl = (q * (log_q - log_p)).sum(dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    cross_entropy = lse - logits.gather(1, picked[:, None]).squeeze(1)
    sums = torch.stack([torch.where(trained, kl, 0.0).sum() * (t * t),
                        torch.where(trained, cross_entropy, 0.0).sum()])
    if not grads:
        return sums, None
    # d soft / d z = T * (softmax(z / T) - q); d hard / d z = softmax(z) - one_hot(target)
    g = log_p.exp_().sub_(q).mul_(soft_weight * t)
    if soft_weight < 1:
        hard = logits.sub(lse[:, None]).exp_()
        hard[torch.arange(len(picked), device=hard.device), picked] -= 1.0
        g.add_(hard, alpha=1 - soft_weight)
    padded_logits[:, vocab:] = 0.0
    padded_logits[:, :vocab] = g.mul_(trained[:, None])
    return sums, padded_logits


class _ChunkedDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
                targets: Tensor, temperature: float, soft_weight: float, dtype: torch.dtype, rows: int,
                pad_to: int) -> tuple[Tensor, Tensor, Tensor]:
        h = hidden.reshape(-1, hidden.shape[-1])
        h_teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        t = targets.reshape(-1)
        vocab = weight.shape[0]
        exact = torch.promote_types(dtype, torch.float32)  # of the softmaxes and the sums
        w, w_teacher = _padded(weight, dtype, pad_to), _padded(teacher_weight, dtype, pad_to)
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=exact) if ctx.needs_input_grad[1] else None
        sums = torch.zeros(2, dtype=exact, device=h.device)  # soft, hard
        for start in range(0, h.shape[0], rows):
            h_chunk = h[start:start + rows].to(dtype)
            teacher_logits = (h_teacher[start:start + rows].to(dtype) @ w_teacher.T).to(exact)
            chunk_sums, g = _distillation_chunk((h_chunk @ w.T).to(exact), teacher_logits,
                                                t[start:start + rows], vocab, temperature, soft_weight, grads)
            sums += chunk_sums
            if g is None:
                continue
            g = g.to(dtype)
            if grad_h is not None:
                grad_h[start:start + rows] = g @ w
            if grad_w is not None:
                grad_w += (g.T @ h_chunk)[:vocab].to(exact)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.shapes = hidden.shape, weight.dtype
        soft, hard = sums[0].clone(), sums[1].clone()
        total = soft_weight * soft + (1 - soft_weight) * hard
        ctx.mark_non_differentiable(soft, hard)
        return total, soft, hard

    @staticmethod
    def backward(ctx, grad_total: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w = ctx.saved_tensors
        hidden_shape, weight_dtype = ctx.shapes
        dh = None if grad_h is None else (grad_h * grad_total).reshape(hidden_shape)
        dw = None if grad_w is None else (grad_w * grad_total).to(weight_dtype)
        return dh, dw, None, None, None, None, None, None, None, None
