"""Setting up a training run, in the order the loop depends on: the accelerator (engine and
precision), the run directory, the model, the data (dataset, feature cache, sampler, loader),
then optimizer and schedule, all prepared by accelerate (`prepare`).

The order is part of the behaviour: the seed is set before the model is built, so its random
initialisation, the sampler's order and every dropout mask are the same in every run of a recipe.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, RandomSampler, Sampler

from seechat.config import dump_recipe
from seechat.data import LengthGroupedSampler, VLMCollator, VLMDataset
from seechat.data.from_recipe import build_dataset
from seechat.data.packing import PackingCollator
from seechat.models.base import SeeChatVLM
from seechat.models.kinds import build_model, load, stage_modes
from seechat.models.modes import parameter_table
from seechat.models.saved import META, check_output_dir
from seechat.precision import resolve_mixed_precision
from seechat.training.optim import make_optimizer, make_schedule, param_groups

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """Everything a training run works with, after `accelerator.prepare`."""

    out: Path
    accelerator: Accelerator
    model: Any  # the prepared model (DDP/FSDP-wrapped where the engine wraps it)
    unwrapped: SeeChatVLM
    dataset: VLMDataset
    sampler: Sampler
    loader: Any  # accelerate's DataLoaderShard (or dispatcher)
    optimizer: Any
    scheduler: Any
    groups: list[dict]
    total: int  # optimizer steps of the whole run


def prepare(recipe: dict, check_engine: Callable[[Accelerator], None] | None = None) -> Session:
    """Accelerator, run directory, model, data, optimizer and schedule of `recipe`, prepared.
    `check_engine` may refuse the accelerator's set-up before anything is built."""
    tcfg = recipe["train"]
    out = Path(recipe["output_dir"])
    accelerator = make_accelerator(tcfg, out)
    if check_engine is not None:
        check_engine(accelerator)
    set_seed(recipe["seed"])
    if accelerator.is_main_process:
        check_output_dir(out / "final", META)  # now, not after hours of training
        out.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, out / "recipe.yaml")

    model = model_for(recipe)
    dataset = build_dataset(recipe, model, "train")
    cache = feature_cache(recipe, model, dataset, accelerator)
    if cache is not None:
        dataset.use_feature_cache(cache)
    sampler = make_sampler(recipe, dataset)
    loader = make_loader(recipe, dataset, sampler, model.tokenizer.pad_token_id)
    groups, lrs = param_groups(model, recipe)
    accelerator.print(parameter_table(model, lrs))
    optimizer = make_optimizer(groups, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"], betas=tuple(tcfg["betas"]))
    scheduler, total = make_schedule(optimizer, tcfg, len(loader), accelerator.num_processes)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    return Session(out, accelerator, model, accelerator.unwrap_model(model), dataset, sampler, loader,
                   optimizer, scheduler, groups, total)


def make_accelerator(tcfg: dict, out: Path) -> Accelerator:
    # accelerate keeps its state in a process-wide singleton; runs in one process (the demo's
    # align then finetune, a notebook, tests) may differ in mixed precision, so start afresh.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        gradient_accumulation_steps=tcfg["grad_accum"],
        mixed_precision=resolve_mixed_precision(tcfg["mixed_precision"]),
        log_with=tcfg["trackers"] or None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # With no GPU, processes started by `accelerate launch --multi_gpu` (torchrun) would each
        # run alone (DistributedType.NO); cpu=True makes them one gloo group (MULTI_CPU).
        cpu=not _has_accelerator(),
        # One scheduler step per update. Linked to the optimizer, accelerate would step it once
        # per process per update (it assumes schedules sized for one process), so N processes
        # ran the schedule N times faster than the planned number of steps.
        step_scheduler_with_optimizer=False,
    )
    _check_engine(accelerator)
    return accelerator


def model_for(recipe: dict) -> SeeChatVLM:
    """The model a recipe trains: built from its experts, or continued from `model.init_from`."""
    mcfg = recipe["model"]
    modes = stage_modes(recipe["stage"], mcfg)
    if mcfg.get("init_from"):
        return load(mcfg["init_from"], trainable=True, modes=modes, model_overrides=mcfg)
    return build_model(mcfg, modes)


def feature_cache(recipe: dict, model: SeeChatVLM, dataset: VLMDataset, accelerator: Accelerator):
    """The recipe's frozen-encoder feature cache (data.feature_cache), filled with every image
    of the training data by the main process; None when off or not applicable."""
    from seechat.data.feature_cache import image_entries, resolve_feature_cache
    from seechat.precision import autocast_dtype

    dcfg = recipe["data"]
    cached = model.cached_encoder()  # stitched: the vision tower; native: the VQ (its codes)
    if cached is None:
        if dcfg["feature_cache"] != "off":
            logger.info("data.feature_cache=%s ignored: a %s model has nothing to cache", dcfg["feature_cache"], model.kind)
        return None
    encoder, mode = cached
    dtype = autocast_dtype(recipe["train"]["mixed_precision"])
    root = Path(recipe["output_dir"]).parent / ".feature_cache"
    cache = resolve_feature_cache(dcfg["feature_cache"], mode, encoder, dtype, root)
    if cache is None or dcfg["format"] != "llava":  # (HF datasets: images are not files to hash)
        return None
    if accelerator.is_main_process:
        cache.fill(image_entries(dataset.samples), encoder.to(accelerator.device), dcfg["image_root"],
                   batch_size=recipe["train"]["batch_size"], compute_dtype=dtype, on_error=dcfg["on_error"])
    accelerator.wait_for_everyone()
    return cache


def make_sampler(recipe: dict, dataset: VLMDataset) -> Sampler:
    """Seeded random order, or length-grouped batches (data.group_by_length)."""
    group_by_length = recipe["data"]["group_by_length"]
    if group_by_length is None:  # the stage default: finetune data varies in length, align data hardly
        group_by_length = recipe["stage"] == "finetune"
    if group_by_length:
        return LengthGroupedSampler(dataset.lengths(), recipe["train"]["batch_size"], seed=recipe["seed"])
    return RandomSampler(dataset, generator=torch.Generator().manual_seed(recipe["seed"]))


def make_loader(recipe: dict, dataset: VLMDataset, sampler: Sampler, pad_token_id: int) -> DataLoader:
    dcfg = recipe["data"]
    collator = PackingCollator(pad_token_id) if dcfg["packing"] else VLMCollator(pad_token_id)
    return DataLoader(
        dataset,
        batch_size=recipe["train"]["batch_size"],
        sampler=sampler,
        collate_fn=collator,
        num_workers=dcfg["num_workers"],
        persistent_workers=dcfg["num_workers"] > 0,
    )


def _check_engine(accelerator: Accelerator) -> None:
    """Refuse a launch that asked for FSDP/DeepSpeed but did not get it: accelerate picks FSDP
    only on GPU-like devices, so on a CPU the request would quietly become plain DDP."""
    for engine, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DEEPSPEED", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(flag, "").lower() == "true" and accelerator.distributed_type.name != engine:
            raise RuntimeError(
                f"the launch asked for {engine} but accelerate set up {accelerator.distributed_type.name} on "
                f"{accelerator.device.type}: accelerate runs {engine} on GPUs only. On a CPU use DDP "
                "(recipes/accelerate/cpu2.yaml or `accelerate launch --multi_gpu --num_processes N`)."
            )


def _has_accelerator() -> bool:
    """A GPU (CUDA, ROCm, XPU, MPS, ...) torch can use."""
    api = getattr(torch, "accelerator", None)  # torch >= 2.6
    return api.is_available() if api is not None else torch.cuda.is_available()
