"""Explicit name -> builder registries for encoders and adapters, filled here and nowhere else.

Adding a backend or adapter is one file plus one line below (and an adapter card in the
top-level `adapters/` folder). Unknown names raise an error listing the valid ones.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

from seechat.models.adapters import AUTO, Adapter, Experts, MLPAdapter, QFormerAdapter, ResamplerAdapter
from seechat.models.encoders import HFVisionEncoder, OpenCLIPVisionEncoder, VisionEncoder

ENCODERS: dict[str, Callable[..., VisionEncoder]] = {
    "open_clip": OpenCLIPVisionEncoder,
    "hf": HFVisionEncoder,
}

ADAPTERS: dict[str, Callable[..., Adapter]] = {
    "mlp": MLPAdapter,
    "qformer": QFormerAdapter,
    "resampler": ResamplerAdapter,
}

# Keys of a part's config that say how it trains, not what it is: dropped when the part is
# built, and taken from the new recipe when training continues from a saved model.
TRAINING_KEYS = ("mode", "lr", "lora", "gradient_checkpointing")


def lookup(registry: dict[str, Callable], kind: str, name: str) -> Callable:
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(registry))}")
    return registry[name]


def _architecture(cfg: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in TRAINING_KEYS + drop}


def build_encoder(cfg: dict[str, Any]) -> VisionEncoder:
    backend = cfg.get("backend", "open_clip")
    builder = lookup(ENCODERS, "encoder backend", backend)
    accepted = inspect.signature(builder).parameters
    kwargs = _architecture(cfg, ("backend",))
    # Recipes carry every backend's keys; unset ones (None) that this backend lacks are dropped.
    extra = [k for k, v in kwargs.items() if k not in accepted and v is not None]
    if extra:
        raise ValueError(f"encoder.{extra[0]} does not apply to the {backend!r} backend "
                         f"(its options: {', '.join(accepted)})")
    return builder(**{k: v for k, v in kwargs.items() if k in accepted})


def adapter_config(cfg: dict[str, Any], experts: Experts) -> dict[str, Any]:
    """`cfg` with the sizes it leaves unset (absent or `auto`) derived from `experts` by its
    adapter type (see `Adapter.derive`); explicit values are kept."""
    builder = lookup(ADAPTERS, "adapter type", cfg.get("type", "mlp"))
    derive = getattr(builder, "derive", None)  # a builder that is no Adapter class derives nothing
    return derive(cfg, experts) if derive else dict(cfg)


def build_adapter(cfg: dict[str, Any], in_dim: int, out_dim: int) -> Adapter:
    """The adapter `cfg` describes; sizes left `auto` must first go through `adapter_config`."""
    builder = lookup(ADAPTERS, "adapter type", cfg.get("type", "mlp"))
    kwargs = _architecture(cfg, ("type",))
    auto = [k for k, v in kwargs.items() if v == AUTO]
    if auto:
        raise ValueError(f"adapter.{auto[0]}=auto is derived from the experts: pass the config through "
                         "seechat.models.registry.adapter_config(cfg, experts) first")
    return builder(in_dim=in_dim, out_dim=out_dim, **kwargs)
