"""The stitched VLM: encode images -> adapt -> splice at `<image>` placeholders -> causal LM.

This class does one thing: put adapted image embeddings where the placeholders are and call a
stock Hugging Face LM through `inputs_embeds`. Freezing and LoRA are decided in
`seechat/models/modes.py`, building in `build.py`, loading in `loading.py`; the loss and the
generation loop are every kind's (`seechat/models/base.py`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from seechat.models.adapters import Adapter
from seechat.models.base import SeeChatVLM
from seechat.models.encoders import VisionEncoder


class StitchedVLM(SeeChatVLM):
    kind = "stitched"
    parts = {
        "encoder": ("frozen", "full", "lora"),
        "adapter": ("frozen", "full"),
        "llm": ("frozen", "full", "lora", "qlora"),
    }

    def __init__(
        self,
        config: dict,
        encoder: VisionEncoder,
        adapter: Adapter,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ):
        super().__init__(config, tokenizer, encoder=encoder, adapter=adapter, llm=llm)

    @property
    def num_image_tokens(self) -> int:
        return self.adapter.num_tokens(self.encoder.num_patches)

    @property
    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        return self.encoder.transform

    # ------------------------------------------------------------------ forward
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n_images, 3, H, W] -> [n_images, num_image_tokens, D_llm]."""
        trains_encoder = any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(trains_encoder and torch.is_grad_enabled()):
            features = self.encoder(pixel_values)
        return self.adapter(features)

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        num_images: torch.Tensor | None = None,
        sample_ids: Sequence[str] | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by adapted image embeddings.
        `image_features` (encoder outputs, e.g. from the feature cache) replace `pixel_values`."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.image_token_id
        per_sample = is_image.sum(dim=1)
        n_tokens = self.num_image_tokens
        images = image_features if image_features is not None else pixel_values
        n_images = 0 if images is None else images.shape[0]
        if num_images is None:  # infer from the placeholders; the total is still checked
            num_images = torch.div(per_sample, n_tokens, rounding_mode="floor")
        num_images = torch.as_tensor(num_images, device=input_ids.device)
        expected = num_images * n_tokens
        if int(num_images.sum()) != n_images or not torch.equal(per_sample, expected):
            bad = [i for i in range(len(per_sample)) if per_sample[i] != expected[i]] or [0]
            i = bad[0]
            name = sample_ids[i] if sample_ids is not None else f"batch index {i}"
            raise ValueError(
                f"sample {name}: {int(per_sample[i])} <image> placeholder tokens but "
                f"{int(num_images[i])} image(s) x {n_tokens} tokens = {int(expected[i])} image "
                f"embeddings expected (batch: {int(per_sample.sum())} placeholders, {n_images} "
                "images given). Tokenise with the model's num_image_tokens."
            )
        if n_images == 0:
            return embeds
        if image_features is not None:
            image_embeds = self.adapter(image_features).to(embeds.dtype)
        else:
            image_embeds = self.encode_images(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.reshape(-1, embeds.shape[-1]))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        num_images: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        sample_ids: Sequence[str] | None = None,
        image_features: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> CausalLMOutputWithPast:
        """With `labels`: the LM head and loss run only at supervised positions (logits=None).
        Without: full logits, as from the LM. Packed rows (seechat/data/packing.py) pass
        `position_ids` that restart at 0 per sample and no `attention_mask`: transformers then
        keeps attention within each sample."""
        embeds = self.embed(input_ids, pixel_values, num_images, sample_ids, image_features)
        if labels is None:
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        return self._lm_loss(labels, inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids)

    # ------------------------------------------------------------------ saving
    def _save_parts(self, tmp: Path, standalone: bool) -> dict[str, Any]:
        """The adapter always; the encoder and LLM in full when they were trained in full, when
        `standalone`, or when there is nothing to refer to (random-init experts of tests and
        tiny demos); LoRA weights apart. Frozen experts stay references (a 7B LoRA run saves
        megabytes)."""
        cfg, modes = self.config, self.modes
        stored: dict[str, Any] = {"adapter": "adapter.safetensors"}
        save_file(_tensors(self.adapter, lora=False), tmp / "adapter.safetensors")
        tower = self.encoder.tower
        if standalone or modes["encoder"] == "full" or not _has_reference(cfg["encoder"], "encoder"):
            save_file(_tensors(tower, lora=False), tmp / "encoder.safetensors")
            stored["encoder"] = "encoder.safetensors"
            stored["encoder_config"] = self.encoder.offline_config()
        if modes["encoder"] == "lora":
            save_file(_tensors(tower, lora=True), tmp / "encoder_lora.safetensors")
            stored["encoder_lora"] = "encoder_lora.safetensors"
        if standalone or modes["llm"] == "full" or not _has_reference(cfg["llm"], "llm"):
            self.base_llm.save_pretrained(tmp / "llm")  # (a LoRA wrapper's base, adapter saved apart)
            stored["llm"] = "llm"
        if self.llm_is_peft:
            # The resized vocabulary rows are a deterministic function of the base (llm.py), so
            # peft need not store the embedding matrices it would otherwise save after a resize.
            self.llm.save_pretrained(tmp / "llm_lora", save_embedding_layers=False)
            stored["llm_lora"] = "llm_lora"
        return stored


def _has_reference(cfg: dict[str, Any], module: str) -> bool:
    if module == "llm":
        return bool(cfg.get("name_or_path"))
    return bool(cfg.get("pretrained")) and (cfg.get("backend") == "open_clip" or bool(cfg.get("name")))


def _tensors(module: nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in module.state_dict().items() if ("lora_" in n) == lora}
