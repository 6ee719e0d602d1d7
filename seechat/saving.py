"""Save and load seechat models: small directories, no pickle.

A saved model holds `seechat.json` (resolved model config, modes, and what is stored where),
the tokenizer, safetensors for the parts that were trained, a peft adapter directory for a LoRA
LLM, and references (Hub name or path) to frozen experts instead of their weights - a 7B LoRA
run saves megabytes. A module is stored in full when it was trained in full or when there is
nothing to refer to (random-init towers of tests and tiny demos).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

from peft import PeftModel
from safetensors.torch import load_file, save_file

from .build import assemble
from .llm import hidden_size
from .model import SeeChatVLM
from .modes import apply_modes, inject_encoder_lora

FORMAT = 1
META = "seechat.json"


def _has_reference(cfg: dict[str, Any], module: str) -> bool:
    if module == "llm":
        return bool(cfg.get("name_or_path"))
    return bool(cfg.get("pretrained")) and (cfg.get("backend") == "open_clip" or bool(cfg.get("name")))


def _tensors(module, lora: bool) -> dict:
    return {
        n: p.detach().contiguous().cpu()
        for n, p in module.state_dict().items()
        if ("lora_" in n) == lora
    }


def check_output_dir(directory: str | os.PathLike, marker: str) -> Path:
    """`directory` if seechat may write it: new, empty, or an earlier output of the same kind
    (it holds the file `marker`), which is replaced whole. Anything else is refused."""
    final = Path(directory)
    if final.is_file() or (final.is_dir() and any(final.iterdir()) and not (final / marker).is_file()):
        raise FileExistsError(f"{final} exists and is not an earlier seechat output (no {marker} in it); "
                              "refusing to replace it. Give a new or empty directory.")
    return final


@contextlib.contextmanager
def writing_dir(directory: str | os.PathLike, marker: str):
    """Write into a temporary directory beside `directory` (`.NAME.seechat-tmp`), which
    replaces `directory` when the block ends (the old one is moved aside first, then deleted)
    and is removed if the block fails. No stale file of an earlier output survives, and only
    what `check_output_dir` allows is ever deleted."""
    final = check_output_dir(directory, marker)
    tmp = final.with_name(f".{final.name}.seechat-tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a write that was killed
    tmp.mkdir(parents=True)
    try:
        yield tmp
        check_output_dir(directory, marker)  # (still true after the work?)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.seechat-old")
    shutil.rmtree(old, ignore_errors=True)
    if final.is_symlink() or final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def save_pretrained(model: SeeChatVLM, directory: str | os.PathLike, standalone: bool = False) -> None:
    """Write the model to `directory` (replaced atomically: written beside it, then renamed).
    `standalone=True` stores every module's weights instead of references to frozen experts
    (what `seechat merge` writes: a checkpoint that needs nothing else)."""
    with writing_dir(directory, META) as tmp:
        cfg, modes = model.config, model.modes
        stored: dict[str, Any] = {"tokenizer": "tokenizer", "adapter": "adapter.safetensors"}
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        save_file(_tensors(model.adapter, lora=False), tmp / "adapter.safetensors")

        tower = model.encoder.tower
        if standalone or modes["encoder"] == "full" or not _has_reference(cfg["encoder"], "encoder"):
            save_file(_tensors(tower, lora=False), tmp / "encoder.safetensors")
            stored["encoder"] = "encoder.safetensors"
            stored["encoder_config"] = model.encoder.offline_config()
        if modes["encoder"] == "lora":
            save_file(_tensors(tower, lora=True), tmp / "encoder_lora.safetensors")
            stored["encoder_lora"] = "encoder_lora.safetensors"

        llm_in_full = standalone or modes["llm"] == "full" or not _has_reference(cfg["llm"], "llm")
        if llm_in_full:
            model.base_llm.save_pretrained(tmp / "llm")  # (a LoRA wrapper's base, adapter saved apart)
            stored["llm"] = "llm"
        if model.llm_is_peft:
            # The resized vocabulary rows are a deterministic function of the base (llm.py), so
            # peft need not store the embedding matrices it would otherwise save after a resize.
            model.llm.save_pretrained(tmp / "llm_lora", save_embedding_layers=False)
            stored["llm_lora"] = "llm_lora"
        meta = {"format": FORMAT, "model": cfg, "modes": modes, "stored": stored}
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str))


def saved_modes(directory: str | os.PathLike) -> dict[str, str]:
    """The per-module modes a saved model was trained with (from its seechat.json)."""
    meta_path = Path(directory) / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved seechat model: {META} is missing")
    return dict(json.loads(meta_path.read_text())["modes"])


def _load_adapter(model: SeeChatVLM, path: Path) -> None:
    """The saved adapter weights into `model.adapter`, with an error that says which expert no
    longer fits (e.g. the encoder a frozen reference points to was swapped for another width)."""
    saved = load_file(path)
    expected = model.adapter.state_dict()
    wrong = [f"{name}: saved {tuple(saved[name].shape)}, needed {tuple(tensor.shape)}"
             for name, tensor in expected.items() if name in saved and saved[name].shape != tensor.shape]
    if wrong:
        raise ValueError(
            f"{path} does not fit this model's adapter: the encoder gives {model.encoder.hidden_size}-wide "
            f"features and the LLM takes {hidden_size(model.base_llm)}-wide embeddings, but "
            + "; ".join(wrong[:3])
            + ". Were the encoder or LLM the saved model refers to replaced by ones of another width?"
        )
    model.adapter.load_state_dict(saved)


def load(
    directory: str | os.PathLike,
    trainable: bool = False,
    modes: dict[str, str] | None = None,
    model_overrides: dict[str, Any] | None = None,
) -> SeeChatVLM:
    """Rebuild a saved model. `trainable=False` (default) freezes everything and sets eval mode.
    To continue training (e.g. finetune from an align run), pass `trainable=True`, the new
    stage's `modes`, and the recipe's `model` section, whose training keys (mode, lr, lora,
    gradient_checkpointing) replace the saved ones."""
    root = Path(directory)
    meta_path = root / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{root} is not a saved seechat model: {META} is missing")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, this seechat reads {FORMAT}")
    if meta["model"].get("kind") == "native":  # early fusion: seechat/native/saving.py
        from .native.saving import load_native

        return load_native(root, meta, trainable, modes, model_overrides)
    cfg, saved_modes, stored = copy.deepcopy(meta["model"]), meta["modes"], meta["stored"]
    modes = modes or saved_modes
    for module, override in (model_overrides or {}).items():
        if module in ("encoder", "llm", "adapter") and isinstance(override, dict):
            for key in ("mode", "lr", "lora", "gradient_checkpointing"):
                if key in override:
                    cfg[module][key] = override[key]
    build_cfg = copy.deepcopy(cfg)
    build_cfg["llm"]["tokenizer"] = str(root / stored["tokenizer"])
    if "llm" in stored:
        build_cfg["llm"]["name_or_path"] = str(root / stored["llm"])
    if "encoder" in stored:
        build_cfg["encoder"] = {**stored["encoder_config"], "mode": cfg["encoder"].get("mode")}
    model = assemble(build_cfg, modes)
    model.config = cfg  # keep the original references, not this directory's paths

    _load_adapter(model, root / stored["adapter"])
    tower = model.encoder.tower
    if "encoder" in stored:
        tower.load_state_dict(load_file(root / stored["encoder"]))
    if "encoder_lora" in stored:
        inject_encoder_lora(model.encoder, cfg["encoder"].get("lora"))
        missing, unexpected = tower.load_state_dict(load_file(root / stored["encoder_lora"]), strict=False)
        if unexpected or any("lora_" in k for k in missing):
            raise ValueError(f"{root / stored['encoder_lora']} does not match the encoder's LoRA layout")
    if "llm_lora" in stored:
        model.llm = PeftModel.from_pretrained(model.llm, str(root / stored["llm_lora"]), is_trainable=trainable)
    apply_modes(model, modes)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model
