"""Optimizer and learning-rate schedule of a run: one AdamW parameter group per trained part
(each part may have its own `model.<part>.lr`), cosine decay to `train.min_lr_ratio` after a
linear warm-up, sized in optimizer steps."""
from __future__ import annotations

import math

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from seechat.models.base import SeeChatVLM


def param_groups(model: SeeChatVLM, recipe: dict) -> tuple[list[dict], dict[str, float]]:
    """The trainable parameters of each part as an optimizer group, and every part's lr."""
    groups, lrs = [], {}
    for module in model.parts:
        lr = (recipe["model"].get(module) or {}).get("lr") or recipe["train"]["lr"]
        params = [p for p in model.part(module).parameters() if p.requires_grad]
        lrs[module] = lr
        if params:
            groups.append({"params": params, "lr": lr, "name": module})
    if not groups:
        raise ValueError("nothing to train: every module is frozen in this stage")
    return groups, lrs


def make_optimizer(
    groups: list[dict], lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters) when every parameter is a float32/bf16/fp16
    tensor on a CPU or CUDA device: on the CPU the fused step is ~8x faster than the default
    for-each one (measured: 0.06 vs 0.47 s for 80M parameters, 1 thread), the same update."""
    params = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for p in params)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas, fused=fused)


def make_schedule(optimizer: torch.optim.Optimizer, tcfg: dict, batches_per_epoch: int,
                  num_processes: int) -> tuple[torch.optim.lr_scheduler.LambdaLR, int]:
    """The schedule and the run's number of optimizer steps: `train.max_steps`, else
    `train.epochs` passes over the data (each process sees 1/num_processes of the batches)."""
    updates_per_epoch = math.ceil(batches_per_epoch / num_processes / tcfg["grad_accum"])
    total = tcfg["max_steps"] or tcfg["epochs"] * updates_per_epoch
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=int(tcfg["warmup_ratio"] * total),
        num_training_steps=total,
        min_lr_rate=tcfg["min_lr_ratio"],
    )
    return scheduler, total
