"""One accelerate loop for every stage (align, finetune): recipe in, run directory out.

The run directory holds `recipe.yaml` (resolved), `metrics.jsonl`, TensorBoard logs,
`checkpoint-<step>/` (accelerate state: model, optimizer, scheduler, RNG + `trainer_state.json`
with the data position) and `final/` (a saved seechat model). `resume=True` continues from the
latest checkpoint; the continued run matches an uninterrupted one (same seed, same order).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from seechat.config import dump_recipe
from seechat.data import LengthGroupedSampler, VLMCollator, VLMDataset, load_hf_dataset, read_llava_records
from seechat.data.packing import PackingCollator, check_packed_attention
from seechat.data.tokenization import IGNORE_INDEX
from seechat.models.base import SeeChatVLM
from seechat.models.kinds import build_model, load, stage_modes
from seechat.models.modes import parameter_table
from seechat.models.saved import META, check_output_dir
from seechat.precision import resolve_mixed_precision
from seechat.training.checkpoint import STATE, latest_checkpoint, remove_stale, save_checkpoint
from seechat.training.guard import NonFiniteError, NonFiniteGuard
from seechat.models.loss import reuse_frozen_head_casts

logger = logging.getLogger(__name__)


def build_dataset(recipe: dict, model: SeeChatVLM, split: str = "train") -> VLMDataset:
    data = recipe["data"]
    source = data.get(split)
    if not source:
        raise ValueError(f"data.{split} is not set: point it at a LLaVA JSON/JSONL file or a dataset")
    if data["format"] == "llava":
        samples: Any = read_llava_records(source, on_error=data["on_error"])
    elif data["format"] == "hf":
        samples = load_hf_dataset(source, split=data["hf_split"], streaming=False)
    else:
        raise ValueError(f"data.format={data['format']!r}; valid: llava, hf")
    if data.get("max_samples"):
        n = data["max_samples"]
        if hasattr(samples, "records"):
            samples.records, samples.sources = samples.records[:n], samples.sources[:n]
        else:
            samples = samples.select(range(min(n, len(samples))))
    return VLMDataset(
        samples,
        tokenizer=model.tokenizer,
        image_transform=model.image_transform,
        num_image_tokens=model.num_image_tokens,
        max_length=data["max_length"],
        truncation=data["truncation"],
        on_error=data["on_error"],
        image_root=data["image_root"],
    )


def model_for(recipe: dict) -> SeeChatVLM:
    """The model a recipe trains: built from its experts, or continued from `model.init_from`."""
    mcfg = recipe["model"]
    modes = stage_modes(recipe["stage"], mcfg)
    if mcfg.get("init_from"):
        return load(mcfg["init_from"], trainable=True, modes=modes, model_overrides=mcfg)
    return build_model(mcfg, modes)


def _feature_cache(recipe: dict, model: SeeChatVLM, dataset: VLMDataset, accelerator: Accelerator):
    """The recipe's frozen-encoder feature cache (data.feature_cache), filled with every image
    of the training data by the main process; None when off or not applicable."""
    from seechat.data.feature_cache import image_entries, resolve_feature_cache
    from seechat.precision import autocast_dtype

    dcfg = recipe["data"]
    if "encoder" not in model.parts:  # e.g. early fusion: images enter as VQ codes
        if dcfg["feature_cache"] != "off":
            logger.info("data.feature_cache=%s ignored: a %s model has no encoder features",
                        dcfg["feature_cache"], model.kind)
        return None
    dtype = autocast_dtype(recipe["train"]["mixed_precision"])
    root = Path(recipe["output_dir"]).parent / ".feature_cache"
    cache = resolve_feature_cache(dcfg["feature_cache"], model.modes.get("encoder", "frozen"), model.encoder, dtype, root)
    if cache is None or dcfg["format"] != "llava":  # (HF datasets: images are not files to hash)
        return None
    if accelerator.is_main_process:
        cache.fill(image_entries(dataset.samples), model.encoder.to(accelerator.device), dcfg["image_root"],
                   batch_size=recipe["train"]["batch_size"], compute_dtype=dtype, on_error=dcfg["on_error"])
    accelerator.wait_for_everyone()
    return cache


def _param_groups(model: SeeChatVLM, recipe: dict) -> tuple[list[dict], dict[str, float]]:
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


_latest_checkpoint = latest_checkpoint  # (seechat/training/checkpoint.py: atomic saves, `latest` pointer)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
    return out


def run(recipe: dict, resume: bool = False) -> dict[str, Any]:
    """Train per `recipe`; returns a summary (final dir, steps, last loss, samples/s, skipped)."""
    tcfg, dcfg = recipe["train"], recipe["data"]
    out = Path(recipe["output_dir"])
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
        # ran the schedule N times faster than the `total` computed below.
        step_scheduler_with_optimizer=False,
    )
    _check_engine(accelerator)
    set_seed(recipe["seed"])
    if accelerator.is_main_process:
        check_output_dir(out / "final", META)  # now, not after hours of training
        out.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, out / "recipe.yaml")

    model = model_for(recipe)
    dataset = build_dataset(recipe, model, "train")
    cache = _feature_cache(recipe, model, dataset, accelerator)
    if cache is not None:
        dataset.use_feature_cache(cache)
    collator = PackingCollator(model.tokenizer.pad_token_id) if dcfg["packing"] else VLMCollator(model.tokenizer.pad_token_id)
    group_by_length = dcfg["group_by_length"]
    if group_by_length is None:  # the stage default: finetune data varies in length, align data hardly
        group_by_length = recipe["stage"] == "finetune"
    if group_by_length:
        sampler = LengthGroupedSampler(dataset.lengths(), tcfg["batch_size"], seed=recipe["seed"])
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(recipe["seed"]))
    loader = DataLoader(
        dataset,
        batch_size=tcfg["batch_size"],
        sampler=sampler,
        collate_fn=collator,
        num_workers=dcfg["num_workers"],
        persistent_workers=dcfg["num_workers"] > 0,
    )
    groups, lrs = _param_groups(model, recipe)
    accelerator.print(parameter_table(model, lrs))
    optimizer = make_optimizer(groups, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"], betas=tuple(tcfg["betas"]))

    updates_per_epoch = math.ceil(len(loader) / accelerator.num_processes / tcfg["grad_accum"])
    total = tcfg["max_steps"] or tcfg["epochs"] * updates_per_epoch
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=int(tcfg["warmup_ratio"] * total),
        num_training_steps=total,
        min_lr_rate=tcfg["min_lr_ratio"],
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    step, epoch, batches_done, skipped = 0, 0, 0, list(dataset.read_skipped)
    nonfinite_before = 0
    resumed_rng = None
    if resume and accelerator.is_main_process:
        remove_stale(out)  # temp directories of a save that was killed
    if resume and (ckpt := _latest_checkpoint(out)) is not None:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / STATE).read_text())
        step, epoch, batches_done = state["step"], state["epoch"], state["batches_in_epoch"]
        skipped = [tuple(s) for s in state["skipped"]]
        nonfinite_before = state.get("nonfinite_steps", 0)
        accelerator.print(f"resumed from {ckpt} at step {step}")
        # Starting a DataLoader iterator draws from the global RNG; the uninterrupted run drew
        # at epoch start, before the checkpoint. Re-apply the checkpoint's RNG state once the
        # resumed iterator has produced its first batch, so dropout masks stay identical.
        resumed_rng = torch.get_rng_state()
    if tcfg["trackers"]:
        accelerator.init_trackers("seechat", config=_flat({"train": tcfg, "stage": recipe["stage"]}))

    metrics_file = open(out / "metrics.jsonl", "a") if accelerator.is_main_process else None
    bar = tqdm(total=total, initial=step, disable=not accelerator.is_main_process, desc=recipe["stage"], mininterval=2)
    unwrapped = accelerator.unwrap_model(model)
    if dcfg["packing"]:  # on the device and in the precision of training
        check_packed_attention(unwrapped.base_llm, accelerator.autocast())
    model.train()
    guard = NonFiniteGuard(tcfg["max_nonfinite_steps"])
    guard.total = nonfinite_before
    seen, t0, last_loss, window, window_tokens = 0, time.time(), float("nan"), [], []
    stop_after = tcfg.get("stop_after")
    max_seconds, timed_out = tcfg.get("max_seconds"), False
    finished = step >= total
    with reuse_frozen_head_casts():  # a frozen LM head is cast to bf16 once, not every step
        while not finished:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            if isinstance(sampler, LengthGroupedSampler):
                sampler.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, batches_done) if batches_done else loader
            micro: list[dict] = []  # the micro-batches of one update (train.grad_accum of them)
            for batch in batches:
                if resumed_rng is not None:
                    torch.set_rng_state(resumed_rng)
                    resumed_rng = None
                batches_done += 1
                skipped += batch["skipped"]
                if batch["input_ids"] is not None:  # None: every sample of the batch was skipped
                    # (safe with several processes: the collectives below are per update, not per
                    # batch, and this process goes on to its next batch; test_distributed)
                    micro.append(batch)
                if not micro or (len(micro) < tcfg["grad_accum"]
                                 and not accelerator.gradient_state.end_of_dataloader):
                    continue
                # Every supervised token of the update weighs the same, whichever micro-batch and
                # process holds it: micro-batch i of a process is weighted by its share of the
                # update's global token count (so 2 processes x 2 micro-batches of 1 train exactly
                # like 1 process x 1 batch of 4). Accumulation syncs DDP only on the last micro-batch.
                counts = [(unwrapped.supervised_labels(b["input_ids"], b["labels"])[:, 1:] != IGNORE_INDEX)
                          .sum().float() for b in micro]
                total_tokens = torch.stack(counts).sum()
                if accelerator.num_processes > 1:
                    total_tokens = accelerator.reduce(total_tokens.clone(), reduction="sum")
                # (accelerate divides each backward by grad_accum and DDP averages over processes;
                # written so that one process without accumulation multiplies the loss by exactly 1)
                undo = accelerator.gradient_accumulation_steps * accelerator.num_processes
                for i, b in enumerate(micro):
                    last = i == len(micro) - 1
                    # DeepSpeed's engine steps inside backward where accelerate says an update ends
                    accelerator.sync_gradients = last
                    with contextlib.nullcontext() if last else accelerator.no_sync(model):
                        loss = model(
                            input_ids=b["input_ids"],
                            attention_mask=b["attention_mask"],
                            pixel_values=b["pixel_values"],
                            num_images=b["num_images"],
                            labels=b["labels"],
                            sample_ids=b["ids"],
                            image_features=b.get("image_features"),
                            position_ids=b.get("position_ids"),
                        ).loss
                        accelerator.backward(loss * (counts[i] / total_tokens.clamp(min=1) * undo))
                    window.append(loss.detach().float() * counts[i])
                    window_tokens.append(counts[i])
                    seen += b["input_ids"].shape[0] * accelerator.num_processes
                micro = []
                # max_norm=inf measures without clipping: the guard needs the norm either way.
                norm = accelerator.clip_grad_norm_(model.parameters(), tcfg["max_grad_norm"] or math.inf)
                finite = guard.is_finite(accelerator, window, norm)
                # A NaN/inf update is not applied: zero_grad below drops it. With fp16's GradScaler
                # the optimizer still "steps": the scaler skips a non-finite step itself, and must
                # see it to lower its scale (and reset its unscale state).
                if finite or accelerator.scaler is not None:
                    optimizer.step()
                scheduler.step()  # skipped updates count as steps: the schedule ends on time
                optimizer.zero_grad()
                step += 1
                stop_message = guard.update(finite, step)
                # mean over every supervised token of the update, on all processes
                summed = accelerator.reduce(torch.stack([torch.stack(window).sum(), torch.stack(window_tokens).sum()]),
                                            reduction="sum")
                last_loss = (summed[0] / summed[1].clamp(min=1)).item()
                window, window_tokens = [], []
                rate = seen / max(time.time() - t0, 1e-9)
                record = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0], "samples_per_s": rate,
                          **({"nonfinite_steps": guard.total} if guard.total else {})}
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}", sps=f"{rate:.1f}")
                if metrics_file and (step % tcfg["log_every"] == 0 or step == total):
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if tcfg["trackers"]:
                        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                if stop_message or (tcfg["save_every"] and step % tcfg["save_every"] == 0):
                    _save_checkpoint(accelerator, out, step, epoch, batches_done, skipped, tcfg["save_total_limit"],
                                     guard)
                if stop_message:
                    if metrics_file:
                        metrics_file.close()
                    accelerator.end_training()
                    raise NonFiniteError(
                        f"{stop_message} Checkpoint (weights before those steps): {out / f'checkpoint-{step}'}")
                if max_seconds:  # every process stops at the same step: any one over budget stops all
                    over = torch.tensor([time.time() - t0 >= max_seconds], device=accelerator.device)
                    timed_out = bool(accelerator.gather(over).any())
                if step >= total or timed_out or (stop_after and step >= stop_after):
                    finished = True
                    break
            else:
                epoch, batches_done = epoch + 1, 0
    loop_seconds = time.time() - t0
    if step < total and not timed_out:  # stop_after: behave like a killed run (no final model)
        bar.close()
        if metrics_file:
            metrics_file.close()
        accelerator.end_training()
        return {"stopped_at": step, "loss": last_loss}
    bar.close()
    accelerator.wait_for_everyone()
    # A bad sample is met once per epoch: count samples, not encounters.
    all_skipped = list({s[0]: s[1] for part in _gather_objects(accelerator, skipped) for s in part}.items())
    final = out / "final"
    if accelerator.is_main_process:
        unwrapped.save_pretrained(final)
        if all_skipped:
            logger.warning("skipped %d bad samples: %s", len(all_skipped), [s[0] for s in all_skipped][:20])
        accelerator.print(f"skipped samples: {len(all_skipped)}")
    if metrics_file:
        metrics_file.close()
        from seechat.training.plots import plot_curves  # loss / lr curves as PNG next to the TensorBoard logs

        plot_curves(out / "metrics.jsonl", out / "logs")
    accelerator.end_training()
    elapsed = time.time() - t0
    return {
        "final": str(final),
        "steps": step,
        "loss": last_loss,
        "samples_per_s": seen / max(elapsed, 1e-9),
        "seconds": elapsed,
        "loop_seconds": loop_seconds,  # training steps only (elapsed also counts saving final/)
        "stopped_by_max_seconds": timed_out,
        "trainable_parameters": sum(p.numel() for g in groups for p in g["params"]),
        "skipped": all_skipped,
        "nonfinite_steps": guard.total,
    }


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


def _gather_objects(accelerator: Accelerator, obj: list) -> list[list]:
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def _save_checkpoint(
    accelerator: Accelerator, out: Path, step: int, epoch: int, batches: int, skipped: list, keep: int,
    guard: NonFiniteGuard | None = None,
) -> None:
    """accelerate state + data position, written atomically (seechat/training/checkpoint.py)."""
    state = {"step": step, "epoch": epoch, "batches_in_epoch": batches, "skipped": skipped,
             "nonfinite_steps": guard.total if guard else 0}
    save_checkpoint(accelerator, out, step, state, keep)
