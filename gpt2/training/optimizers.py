"""How a run updates its weights: the optimisers and the learning-rate schedule.

``--optimizer adamw`` is nanoGPT's recipe: AdamW on everything, weight decay on matrices and
embeddings only. ``--optimizer muon`` is modded-nanogpt's: PyTorch's ``torch.optim.Muon`` (momentum
orthogonalised by Newton-Schulz iterations) on the transformer blocks' 2-D weight matrices, AdamW on
the rest (the tied token embedding and LM head, the position embedding, biases, LayerNorms), each
with its own learning rate and weight decay. Neither changes the architecture.

The schedule multiplies every group's peak rate by one factor: a linear warm-up, then either a
cosine decay (``cosine``) or a constant phase and a linear decay (``wsd``: warm-up, stable, decay),
the decay taking the last ``decay_fraction`` of the run. A run under ``wsd`` can be extended by
resuming it, with a longer ``--max-steps`` or ``--time-limit``, from a checkpoint taken before its
decay began.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gpt2.training.config import TrainConfig

PEAK_LR = "peak_lr"  # each parameter group's own peak learning rate, which the schedule scales


def muon_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters Muon updates: the trained 2-D weight matrices of the transformer
    blocks (attention's and the MLP's products, and LoRA's adapters when fine-tuning with them)."""
    return [name for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and name.startswith("transformer.h.")]


def build_optimizers(model: nn.Module, cfg: TrainConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """The run's optimisers: AdamW alone, or Muon and AdamW over disjoint parameters."""
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    to_muon = set(muon_parameters(model)) if cfg.optimizer == "muon" else set()
    rest = [p for name, p in trained.items() if name not in to_muon]
    adamw_groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay, PEAK_LR: cfg.lr},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, PEAK_LR: cfg.lr},
    ]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW([g for g in adamw_groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                          eps=1e-8, fused=device.type == "cuda")
    ]
    if to_muon:
        lr, decay, momentum = cfg.muon_settings()
        matrices = [p for name, p in trained.items() if name in to_muon]
        optimizers.append(torch.optim.Muon([{"params": matrices, PEAK_LR: lr}], lr=lr, weight_decay=decay,
                                           momentum=momentum))
    return optimizers


def set_learning_rates(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    """Every group at ``factor`` times its own peak learning rate."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group[PEAK_LR] * factor


def lr_factor(cfg: TrainConfig, step: int, progress: float) -> float:
    """The schedule at optimiser step ``step`` and ``progress`` (0 to 1, in steps or time, of the
    whole run): linear warm-up over ``warmup_steps``, times the decay from 1 to ``min_lr_ratio``
    over the last ``decay_fraction`` of the run (a cosine, or ``wsd``'s straight line)."""
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    fraction = cfg.schedule_decay_fraction()
    into_decay = min(1.0, max(0.0, (progress - (1.0 - fraction)) / fraction))
    if cfg.lr_schedule == "cosine":
        remaining = 0.5 * (1.0 + math.cos(math.pi * into_decay))
    else:
        remaining = 1.0 - into_decay
    return warmup * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * remaining)


def decay_started(cfg: TrainConfig, progress: float) -> bool:
    """Whether the run's learning rate has begun its final decay (``wsd``'s stable phase is over)."""
    return progress > 1.0 - cfg.schedule_decay_fraction()
