"""Export a seechat model to stock transformers `LlavaForConditionalGeneration` (`seechat export
--to llava-hf`), loadable with `LlavaForConditionalGeneration.from_pretrained` + `AutoProcessor`
and by servers that read llava-hf checkpoints (vLLM).

What maps: a CLIP/SigLIP tower (transformers, or an open_clip ViT with CLIP's architecture, see
`clip_convert.py`), the `mlp2x_gelu` projector (Llava's linear_1 -> GELU -> linear_2) and the
`linear` projector (linear_1, identity activation, linear_2 = identity matrix: exact), and any
causal LM transformers' Llava can hold (`AutoModel.from_config(text_config)`). LoRA is merged
first. What does not: `pixel_shuffle` (Llava has no space-to-depth step), deeper MLPs
(mlp3x_gelu...), Q-Former and resampler adapters, image boundary tokens; each raises
`NotExpressibleError` naming the part.

Image preprocessing is written as the encoder's own processor: a transformers tower's
(`SiglipImageProcessor` for SigLIP: squash to S x S; `CLIPImageProcessor` for CLIP: shortest
edge + crop), or a `CLIPImageProcessor` from an open_clip tower's preprocess_cfg. Its PIL
backend (`AutoProcessor.from_pretrained(OUT, backend="pil")`) reproduces seechat's pixels
exactly (logits equal to ~1e-7); the default torchvision backend resizes with a slightly
different bicubic kernel (pixels differ by up to 2/255 before normalisation), so its logits
differ slightly more.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.image_utils import SizeDict
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from seechat.models.adapters.mlp import MLPAdapter
from seechat.tools.clip_convert import NotExpressibleError, vision_tower_for_export
from seechat.data.tokenization import boundary_ids, stop_token_ids
from seechat.models.loss import config_transform
from seechat.models.llm import IMAGE_TOKEN
from seechat.tools.merge import merge_lora
from seechat.models.base import SeeChatVLM

__all__ = ["EXPORT_MARKER", "NotExpressibleError", "export_llava_hf", "flattening_template", "llava_chat_template", "model_to_llava"]

EXPORT_MARKER = "seechat_export.json"  # marks a directory `seechat export` wrote


def flattening_template(marker: str, marker_text_is_image: bool = False) -> str:
    """A Jinja prefix that flattens messages whose content is a list of image/text parts:
    images become `marker + "\n"` before the message's text - what SeeChatVLM.chat() writes with
    "<image>" - so an exported template renders the same prompt as seechat. String contents pass
    through unchanged; the LM's own template then renders the flattened messages.
    `marker_text_is_image`: a text part that is exactly `marker` counts as an image too (how
    llama.cpp's mtmd hands images to a template)."""
    is_image = "c['type'] in ('image', 'image_url')"
    if marker_text_is_image:
        is_image += " or (c['type'] == 'text' and c['text'] == '" + marker + "')"
    return (
        "{%- set ns = namespace(messages=[]) -%}"
        "{%- for m in messages -%}"
        "{%- if m['content'] is string -%}{%- set ns.messages = ns.messages + [m] -%}"
        "{%- else -%}{%- set parts = namespace(images='', text='') -%}"
        "{%- for c in m['content'] -%}"
        "{%- if " + is_image + " -%}{%- set parts.images = parts.images + '" + marker + "\\n' -%}"
        "{%- elif c['type'] == 'text' -%}{%- set parts.text = parts.text + c['text'] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set ns.messages = ns.messages + [{'role': m['role'], 'content': parts.images + parts.text}] -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- set messages = ns.messages -%}"
    )


def llava_chat_template(lm_template: str) -> str:
    """The LM's chat template, extended to messages whose content is a list of image/text parts."""
    return flattening_template(IMAGE_TOKEN) + lm_template


def _projector(adapter: nn.Module, d_llm: int) -> tuple[dict[str, torch.Tensor], str]:
    """(Llava projector state dict, projector_hidden_act) for seechat's MLP adapter."""
    if not isinstance(adapter, MLPAdapter):
        raise NotExpressibleError(
            f"adapter {type(adapter).__name__} has no Llava equivalent; only the MLP adapter "
            "(projector linear or mlp2x_gelu) can be exported to llava-hf"
        )
    if adapter.pixel_shuffle > 1:
        raise NotExpressibleError(
            f"adapter.pixel_shuffle={adapter.pixel_shuffle}: transformers' Llava has no pixel shuffle "
            "(space-to-depth) step before its projector, so this model cannot be written as llava-hf; "
            "export a model trained with pixel_shuffle: 1"
        )
    layers = [m for m in adapter.proj if isinstance(m, nn.Linear)]
    if adapter.projector == "mlp2x_gelu":
        first, second = layers
        state = {"linear_1.weight": first.weight, "linear_1.bias": first.bias,
                 "linear_2.weight": second.weight, "linear_2.bias": second.bias}
        return {k: v.detach().clone() for k, v in state.items()}, "gelu"
    if adapter.projector == "linear":
        (only,) = layers
        eye = torch.eye(d_llm, dtype=only.weight.dtype)
        return {"linear_1.weight": only.weight.detach().clone(), "linear_1.bias": only.bias.detach().clone(),
                "linear_2.weight": eye, "linear_2.bias": torch.zeros(d_llm, dtype=only.weight.dtype)}, "linear"
    raise NotExpressibleError(
        f"adapter.projector={adapter.projector!r}: Llava's projector is exactly two linear layers "
        "(linear_1, activation, linear_2); only 'mlp2x_gelu' and 'linear' can be exported"
    )


def model_to_llava(model: SeeChatVLM) -> LlavaForConditionalGeneration:
    """An in-memory `LlavaForConditionalGeneration` made of `model`'s own modules (shared, not
    copied; `model`'s LoRA is merged in place first)."""
    if boundary_ids(model.tokenizer) is not None:
        raise NotExpressibleError(
            "the tokenizer wraps images in boundary tokens (llm.image_boundary_tokens); Llava's "
            "processor only expands <image>, so the exported model would see different prompts"
        )
    merge_lora(model)
    llm = model.base_llm
    transform = config_transform(llm.config)
    if not transform.identity:  # Llava's lm_head is applied as is
        raise NotExpressibleError(
            f"the LM ({llm.config.model_type}) transforms its logits ({transform}: final_logit_softcapping, "
            "logit_scale or logits_scaling); LlavaForConditionalGeneration does not, so the export would answer differently"
        )
    d_llm = llm.get_input_embeddings().weight.shape[1]
    projector, act = _projector(model.adapter, d_llm)
    tower, has_cls = vision_tower_for_export(model.encoder)
    vision_config = tower.config
    encoder = model.encoder
    # Llava indexes hidden_states (index 0 = embeddings, i + 1 = block i), as seechat does;
    # written negative, as LLaVA writes it (-2 = penultimate block).
    feature_layer = encoder.hidden_index - (vision_config.num_hidden_layers + 1)
    if has_cls:
        strategy = "full" if encoder.keep_cls else "default"
    else:  # SigLIP: no CLS; "default" would drop a real patch
        strategy = "full"
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=llm.config,
        image_token_index=model.image_token_id,
        image_seq_length=model.num_image_tokens,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act=act,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)),
    )
    # The skeleton is built on the meta device and its parts are the model's own modules:
    # no second copy of a 7B LM in memory, no random init to overwrite.
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    dtype = llm.get_input_embeddings().weight.dtype
    decoder = llm.get_decoder()
    for name, mine, theirs in (("vision tower", tower, llava.model.vision_tower),
                               ("language model", decoder, llava.model.language_model)):
        if type(mine) is not type(theirs):  # what Llava builds from the config must be what we hand it
            raise NotExpressibleError(f"{name}: Llava builds {type(theirs).__name__}, seechat has {type(mine).__name__}")
    llava.model.vision_tower = tower.to(dtype)
    llava.model.language_model = decoder
    llava.lm_head = llm.get_output_embeddings()
    projector_module = LlavaMultiModalProjector(config).to(dtype)
    projector_module.load_state_dict(projector, strict=True)
    llava.model.multi_modal_projector = projector_module
    leftover = [n for n, t in [*llava.named_parameters(), *llava.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"Llava parts without seechat weights: {leftover[:5]}")
    llava.eval()
    return llava


def image_processor_for(model: SeeChatVLM):
    """The transformers image processor whose pixels are the encoder's: a transformers tower's
    own processor (SiglipImageProcessor for SigLIP: squash, no crop), or for an open_clip tower a
    CLIPImageProcessor written from its preprocess_cfg."""
    transform = model.encoder.transform
    processor = transform.processor() if hasattr(transform, "processor") else None
    if processor is None:
        raise NotExpressibleError(
            f"the encoder's image transform {transform} has no transformers image processor "
            "(open_clip resize_mode 'longest' pads to a square, which CLIP/SigLIP processors cannot)"
        )
    if getattr(processor, "crop_size", None) is None:  # (SigLIP) Llava's processor counts tokens from it
        height, width = transform.output_size
        processor.crop_size = SizeDict(height=height, width=width)  # (unused: no crop)
        processor.do_center_crop = False
    return processor


def _hub_vision_prefix(out: Path) -> None:
    """Rename `vision_tower.*` to `vision_tower.vision_model.*` in the saved weights: the layout
    of the llava-hf checkpoints on the Hub, which every vLLM and transformers 4.x read.
    transformers 5 (whose CLIP/SigLIP towers dropped the `vision_model` level) maps it back
    on load (its conversion_mapping strips the prefix)."""

    def rename(key: str) -> str:
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + key[len("vision_tower."):]
        return key

    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(shard)
        save_file({rename(k): v for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    index = out / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def export_llava_hf(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Export the saved seechat model at `model_dir` to a llava-hf directory `out_dir`: config,
    safetensors, tokenizer (with <image>), image processor + processor configs, chat template,
    generation config. Raises `NotExpressibleError` for models Llava cannot represent."""
    from seechat.tools.merge import load_unquantised
    from seechat.models.saved import writing_dir

    with writing_dir(out_dir, EXPORT_MARKER) as out:  # written aside, then moved: no stale shards survive
        model = load_unquantised(model_dir)
        llava = model_to_llava(model)
        tokenizer = model.tokenizer
        template = llava_chat_template(tokenizer.chat_template)
        tokenizer.chat_template = template
        cfg = llava.config
        processor = LlavaProcessor(
            image_processor=image_processor_for(model),
            tokenizer=tokenizer,
            patch_size=cfg.vision_config.patch_size,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            chat_template=template,
            image_token=IMAGE_TOKEN,
            # Llava's processor counts (H/p)*(W/p) + this, minus one for "default" (CLS dropped).
            num_additional_image_tokens=1 if cfg.vision_config.model_type == "clip_vision_model" else 0,
        )
        eos = stop_token_ids(tokenizer)  # eos and the template's end token (<end_of_turn>, <|eot_id|>)
        llava.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            do_sample=False,
            # seechat never emits the placeholder token; neither should the export.
            suppress_tokens=[model.image_token_id],
            max_new_tokens=64,
        )
        llava.save_pretrained(out)
        _hub_vision_prefix(out)
        processor.save_pretrained(out)
        n = processor._get_num_multimodal_tokens(image_sizes=[[1, 1]]).num_image_tokens[0]
        if n != cfg.image_seq_length:
            raise RuntimeError(f"exported processor expands <image> to {n} tokens, the model expects {cfg.image_seq_length}")
        (out / EXPORT_MARKER).write_text(json.dumps({"source": str(model_dir), "model": model.config}, indent=2, default=str))
    return Path(out_dir)
