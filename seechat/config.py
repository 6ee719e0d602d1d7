"""Recipes: YAML with `inherit:`, adapter cards, dotted command-line overrides, validation.

A recipe has `model` (`encoder`, `adapter`, `llm`), `data`, `train`, `eval` and `stage`.
`model.adapter: qformer` loads the packaged card qformer (seechat/resources/adapters/, copies of
`adapters/*.yaml`); a mapping with `card:` loads the card and overrides keys of it; a card may
also be a file (`card: cards/mine.yaml`). Relative paths in a recipe file are relative to that
file, on the command line to the current directory (seechat/recipe_paths.py says exactly).
On the command line `train.lr=2e-4 adapter=qformer adapter.num_queries=64` works; `encoder.`,
`adapter.` and `llm.` are short for `model.*.`.
Unknown keys are errors that suggest the closest valid key.
"""
from __future__ import annotations

import copy
import difflib
import inspect
import re
from pathlib import Path
from typing import Any

import yaml

from seechat import recipe_paths, resources
from seechat.errors import RecipeError
from seechat.models.kinds import KINDS
from seechat.models.modes import LORA_DEFAULTS
from seechat.models.registry import ADAPTERS, TRAINING_KEYS, lookup

# The checkout's root, for tests and benchmarks; library code uses seechat.resources instead
# (from an installed wheel this is site-packages).
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = resources.recipe_file("easyvqa_align.yaml")

DEFAULTS: dict[str, Any] = {
    "stage": "align",
    "seed": 0,
    "output_dir": "runs/default",
    "model": {
        "kind": "stitched",
        "init_from": None,  # a saved seechat model (e.g. the align run's final/) to start from
        "encoder": {
            "backend": "open_clip",
            "name": "ViT-L-14-336-quickgelu",
            "pretrained": "openai",
            "config": {},
            "arch": None,  # hf random init only: clip | siglip
            "feature_layer": -2,
            "keep_cls": False,
            "dtype": None,
            "trust_remote_code": None,  # hf backend: run the repo's own code (false unless set)
            "mode": None,
            "lr": None,
            "lora": None,
        },
        "adapter": "mlp2x_gelu",
        "llm": {
            "name_or_path": None,
            "tokenizer": None,
            "chat_template": None,  # chatml | llama2 | vicuna | a Jinja string (base tokenizers)
            "config": None,
            "dtype": None,
            "attn_implementation": None,
            "trust_remote_code": False,
            "device_map": None,
            "image_boundary_tokens": False,
            "gradient_checkpointing": False,
            "mode": None,
            "lr": None,
            "lora": None,
        },
        # kind: native only (seechat/models/native/): the VQ image tokenizer and Chameleon's stabilisers
        "native": {
            "vq": None,  # a saved seechat.models.native.vq.VQTokenizer directory
            "init_from": None,  # a text LM to grow (its vocabulary + the codes); None: llm.config, from scratch
            "user_image_weight": 0.0,  # loss weight of the codes of images in user turns (0: not targets)
            "reply_image_weight": 1.0,  # loss weight of the image tokens of replies (drawings) against text's 1
            "code_init_share": 0.0,  # grown LM: share of a code row's variance along its codebook vector (extend.py)
            "code_word_share": 0.0,  # grown LM: share of the way a code row moves to the words it stands for (extend.py)
            "cfg_dropout": 0.0,  # drawings: rate at which training drops the prompt (classifier-free guidance)
            "qk_norm": True,  # false: the LM's q_norm/k_norm become identities (ablation)
            "z_loss": 0.0,  # coefficient of mean(logsumexp(logits)^2) at supervised positions
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,  # after each attention and feed-forward block (residual branch)
        },
    },
    "data": {
        "format": "llava",  # llava (JSON/JSONL) | hf (datasets.load_dataset)
        "train": None,
        "val": None,
        "test": None,
        "image_root": None,
        "hf_split": "train",
        "max_length": 2048,
        "truncation": "drop",  # an image would be cut: drop | raise
        "on_error": "raise",  # bad sample: raise | skip
        "max_samples": None,
        "num_workers": 2,
        "group_by_length": None,  # None: on for finetune, off for align (seechat/data/sampler.py)
        "packing": False,  # several samples per row, attention kept per sample (data/packing.py)
        "feature_cache": "off",  # off | auto | <dir>: frozen-encoder features (data/feature_cache.py)
    },
    "train": {
        "epochs": 1,
        "max_steps": None,
        "batch_size": 8,  # per process
        "grad_accum": 1,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "warmup_ratio": 0.03,
        "min_lr_ratio": 0.0,
        "max_grad_norm": 1.0,
        "mixed_precision": "auto",  # auto: bf16 where the hardware has bf16 units (precision.py)
        "log_every": 10,
        "save_every": None,
        "save_total_limit": 2,
        "trackers": ["tensorboard"],
        "stop_after": None,  # stop (as if killed) after this many steps: for resume tests
        "max_seconds": None,  # wall-clock budget of the loop: stop there and save final/
        "max_nonfinite_steps": 10,  # NaN/inf loss or gradient: step skipped; this many in a row stop the run
    },
    # data.val during training (seechat/training/validation.py); `seechat eval` has its own flags
    "eval": {
        "every": 0,  # validate every this many optimizer steps; 0: only at the end of the stage
        "batch_size": 32,
        "max_new_tokens": 8,
        "max_samples": None,  # the first this many questions of data.val
    },
}

# Keys recipes could set once, with what to do instead (an error, not a silently ignored key).
REMOVED = {
    ("data", "streaming"): "training reads a map-style dataset (seeded shuffling, exact resume, the "
                           "feature cache need one); remove data.streaming, or cut a large file with data.max_samples",
    ("eval", "split"): "data.val is what training validates on, and `seechat eval --data FILE` names its file; "
                       "remove eval.split",
}

# Mappings whose keys belong to someone else (a transformers/open_clip config).
FREE_FORM = {("model", "encoder", "config"), ("model", "llm", "config")}
SHORTHAND = ("encoder", "adapter", "llm")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `2e-4` as a float (YAML 1.1 insists on `2.0e-4`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read, inherit, override, validate and fill a recipe; adapter cards resolved."""
    path = Path(path) if path else DEFAULT_RECIPE
    recipe = _read_with_inheritance(path, seen=())
    for item in overrides or []:
        key = apply_override(recipe, item)
        recipe_paths.mark(recipe, Path.cwd(), recipe_paths.COMMAND_LINE, under=key)
    _resolve_adapter(recipe)
    _validate(recipe, DEFAULTS, ())
    resolved = _merge(copy.deepcopy(DEFAULTS), recipe)
    recipe_paths.resolve(resolved)  # relative paths: to their recipe file, or to the cwd (overrides)
    for module in ("encoder", "llm"):
        if resolved["model"][module].get("lora") is not None:
            resolved["model"][module]["lora"] = {**LORA_DEFAULTS, **resolved["model"][module]["lora"]}
    return resolved


def _read_with_inheritance(path: Path, seen: tuple) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist")
    if path.resolve() in seen:
        raise RecipeError(f"recipe {path} inherits itself: {' -> '.join(map(str, seen))}")
    raw = _yaml(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping")
    # A packaged recipe stands for ./recipes/<name> of the project run from (seechat/recipe_paths.py).
    base_dir = Path.cwd() / "recipes" if resources.is_packaged_recipe(path) else path.parent
    recipe_paths.mark(raw, base_dir, str(path))
    parent = raw.pop("inherit", None)
    if parent is None:
        return raw
    base = _read_with_inheritance(_inherited(path, str(parent)), seen + (path.resolve(),))
    return _merge(base, raw)


def _inherited(path: Path, parent: str) -> Path:
    """`inherit: X` is the file X beside `path`; when there is none and X is a bare file name,
    the packaged base recipe X (so a recipe outside the checkout may inherit the shipped ones)."""
    beside = path.parent / parent
    if beside.is_file() or Path(parent).name != parent:
        return beside
    if (resources.RECIPES / parent).is_file():
        return resources.recipe_file(parent)
    raise RecipeError(f"recipe {path}: inherit: {parent} names neither a file beside it ({beside}) nor a "
                      f"packaged recipe (packaged: {', '.join(resources.recipe_names())})")


def apply_override(recipe: dict, item: str) -> tuple[str, ...]:
    """Apply one `dotted.key=value` override (value parsed as YAML); returns the full key."""
    if "=" not in item:
        raise RecipeError(f"override {item!r} must look like key=value (e.g. train.lr=2e-4)")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if parts[0] in SHORTHAND:
        parts = ["model"] + parts
    node = recipe
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and parts[: i + 1] == ["model", "adapter"]:  # (a Given is a str)
            child = {"card": child}  # adapter=qformer adapter.num_queries=64
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a mapping")
        node[part] = child
        node = child
    node[parts[-1]] = _yaml(value)
    return tuple(parts)


def _resolve_adapter(recipe: dict) -> None:
    model = recipe.setdefault("model", {})
    kind = model.get("kind", DEFAULTS["model"]["kind"])
    if kind not in KINDS:
        raise RecipeError(f"model.kind={kind!r}; valid: {', '.join(KINDS)}")
    if "adapter" not in KINDS[kind].model.parts:  # e.g. early fusion: images enter as VQ codes
        if model.get("adapter") not in (None, {}):
            raise RecipeError(f"model.kind={kind} has no adapter; remove model.adapter")
        model["adapter"] = {}
        return
    adapter = model.get("adapter", DEFAULTS["model"]["adapter"])
    if isinstance(adapter, str):
        adapter = {"card": adapter}
    if not isinstance(adapter, dict):
        raise RecipeError(f"model.adapter must be a card name or a mapping, got {adapter!r}")
    adapter = dict(adapter)
    card = adapter.pop("card", None)
    if card:
        adapter = {**load_card(card), **adapter}
    if "type" not in adapter:
        raise RecipeError("model.adapter needs a card name or a `type` (mlp, qformer, resampler)")
    builder = lookup(ADAPTERS, "adapter type", adapter["type"])
    params = inspect.signature(builder).parameters
    valid = [p for p in params if p not in ("in_dim", "out_dim")] + ["type", *TRAINING_KEYS]
    for key in adapter:
        if key not in valid:
            raise RecipeError(_unknown(f"model.adapter.{key}", key, valid, f"adapter type {adapter['type']!r}"))
        derived = getattr(builder, "follows_experts", ())
        if adapter[key] == "auto" and key not in derived:
            follows = ", ".join(derived) or "none"
            raise RecipeError(f"model.adapter.{key}=auto: adapter type {adapter['type']!r} derives only "
                              f"these keys from the experts: {follows}; set {key} to a value")
    model["adapter"] = adapter


def load_card(name: str) -> dict:
    """A packaged adapter card by name (`qformer`), or a card file by path (`cards/my.yaml`,
    relative to the recipe that names it, or to the current directory on the command line)."""
    if recipe_paths.looks_like_card_file(name):
        path = recipe_paths.card_path(name)
        if not path.is_file():
            raise RecipeError(recipe_paths.missing_card(name))
    else:
        path = resources.card_file(name)
        if path is None:
            raise RecipeError(f"unknown adapter card {name!r}; valid cards: {', '.join(resources.card_names())}")
    card = _yaml(path.read_text()) or {}
    if not isinstance(card, dict):
        raise RecipeError(f"adapter card {path} must be a YAML mapping")
    return card


def _validate(node: dict, schema: dict, where: tuple) -> None:
    for key, value in node.items():
        path = where + (key,)
        if path == ("model", "adapter"):
            continue  # checked against the adapter's own signature
        if path in REMOVED:
            raise RecipeError(f"{'.'.join(path)} is no longer a recipe key: {REMOVED[path]}")
        if key not in schema:
            raise RecipeError(_unknown(".".join(path), key, list(schema), ".".join(where) or "the recipe"))
        if path in FREE_FORM or path[-1] == "lora":
            if path[-1] == "lora" and value is not None:
                for k in value:
                    if k not in LORA_DEFAULTS:
                        raise RecipeError(_unknown(".".join(path + (k,)), k, list(LORA_DEFAULTS), "lora"))
            continue
        if isinstance(schema[key], dict):
            if not isinstance(value, dict):
                raise RecipeError(f"{'.'.join(path)} must be a mapping, got {value!r}")
            _validate(value, schema[key], path)


def _unknown(full: str, key: str, valid: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key {full!r} in {where}{hint} (valid: {', '.join(sorted(valid))})"


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        # A new adapter card/type replaces the inherited adapter instead of mixing with it.
        replaces = key == "adapter" and isinstance(value, dict) and ("card" in value or "type" in value)
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not replaces:
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dump_recipe(recipe: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe, sort_keys=False))
