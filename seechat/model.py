"""The stitched VLM: encode images -> adapt -> splice at `<image>` placeholders -> causal LM.

This class does one thing: put adapted image embeddings where the placeholders are and call a
stock Hugging Face LM through `inputs_embeds`. Freezing and LoRA are decided in `modes.py`,
building in `build.py`, saving in `saving.py`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from .adapters import Adapter
from .encoders import VisionEncoder
from .llm import IMAGE_TOKEN
from .loss import chunked_head_loss
from .precision import reuse_autocast_casts

IGNORE_INDEX = -100


class SeeChatVLM(nn.Module):
    def __init__(
        self,
        config: dict,
        encoder: VisionEncoder,
        adapter: Adapter,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.adapter = adapter
        self.llm = llm
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.modes: dict[str, str] = {}

    # ------------------------------------------------------------------ structure
    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image: what `<image>` expands to at tokenisation."""
        return self.adapter.num_tokens(self.encoder.num_patches)

    @property
    def llm_is_peft(self) -> bool:
        return hasattr(self.llm, "peft_config")

    @property
    def base_llm(self) -> PreTrainedModel:
        """The transformers model under any peft wrapper (LoRA layers stay injected in it)."""
        return self.llm.get_base_model() if self.llm_is_peft else self.llm

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def save_pretrained(self, directory: str) -> None:
        from .saving import save_pretrained

        save_pretrained(self, directory)

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

    def supervised_labels(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The labels the loss averages over (the training loop weights batches by their count)."""
        return labels

    def _lm_loss(self, labels: torch.Tensor, z_loss: float = 0.0, **inputs) -> CausalLMOutputWithPast:
        """The LM's decoder on `inputs`, then head + loss at the supervised positions only."""
        base = self.base_llm
        hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if not keep.any():  # nothing supervised: a zero that still has a graph
            return CausalLMOutputWithPast(loss=hidden.sum() * 0.0)
        # Chunked: the [n_supervised, V] logits never exist at once (see seechat/loss.py).
        loss = chunked_head_loss(hidden[:, :-1][keep], base.get_output_embeddings(), targets[keep], z_loss=z_loss)
        return CausalLMOutputWithPast(loss=loss)

    # ------------------------------------------------------------------ generation
    def chat(
        self,
        prompt: str,
        image=None,
        max_new_tokens: int = 64,
        *,
        images: Sequence | None = None,
        on_text: Callable[[str], None] | None = None,
        **sampling,
    ) -> str:
        """One-turn answer (greedy unless `do_sample=True`) to `prompt` about `images` (paths or
        PIL images; `image` for one). `on_text` receives the answer as it is generated."""
        from .conversation import answer, user_text

        images = list(images or []) + ([image] if image is not None else [])
        turn = {"from": "human", "value": user_text(prompt, len(images))}
        return answer(self, [turn], images, max_new_tokens, on_text, **sampling)

    def prepare(self, prompts: Sequence[str], images: Sequence[Sequence] | None = None) -> dict:
        """A left-padded batch of single-turn prompts for `generate(**batch)`; `images[i]` is
        the list of images of prompt i. See seechat/conversation.py."""
        from .conversation import prepare

        return prepare(self, prompts, images)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """`generate`'s output as answer strings."""
        from .conversation import decode

        return decode(self, tokens)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        num_images: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        use_cache: bool = True,
        eos_token_id: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        allowed_ids: torch.Tensor | None = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Batched greedy / sampling decoding of left-padded prompts. Returns the new tokens
        [B, <= max_new_tokens], padded with the pad id after each sequence's end token.
        `allowed_ids` (bool [vocab]) restricts what may be emitted (the native path: text only
        when answering, image codes only when drawing). `on_token` is called with each step's
        tokens [B] as they are chosen (streaming)."""
        # Each frozen weight is cast to bf16 once per call instead of once per token (precision.py).
        with reuse_autocast_casts(self):
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            if not bool(attention_mask[:, -1].all()):
                raise ValueError("generate() needs left-padded prompts (tokenizer padding_side='left')")
            eos = eos_token_id if eos_token_id is not None else self.tokenizer.eos_token_id
            eos = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=input_ids.device)
            pad = self.tokenizer.pad_token_id
            embeds = self.embed(input_ids, pixel_values, num_images)
            mask = attention_mask.long()
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            step_embeds, step_positions = embeds, positions
            cache = DynamicCache() if use_cache else None
            finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            new_tokens = []
            embed_tokens = self.llm.get_input_embeddings()
            for _ in range(max_new_tokens):
                out = self.llm(
                    inputs_embeds=step_embeds,
                    attention_mask=mask,
                    position_ids=step_positions,
                    past_key_values=cache,
                    use_cache=use_cache,
                    logits_to_keep=1,
                )
                logits = out.logits[:, -1].float()
                logits[:, self.image_token_id] = float("-inf")  # never emit a placeholder
                if allowed_ids is not None:
                    logits = logits.masked_fill(~allowed_ids.to(logits.device), float("-inf"))
                token = _pick(logits, do_sample, temperature, top_k, top_p, generator)
                token = torch.where(finished, torch.full_like(token, pad), token)
                new_tokens.append(token)
                if on_token is not None:
                    on_token(token)
                finished |= torch.isin(token, eos)
                if finished.all():
                    break
                next_embeds = embed_tokens(token).unsqueeze(1)
                next_positions = positions[:, -1:] + 1
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                positions = torch.cat([positions, next_positions], dim=1)
                if use_cache:
                    step_embeds, step_positions = next_embeds, next_positions
                else:  # recompute everything: the reference the cached path must equal
                    embeds = torch.cat([embeds, next_embeds], dim=1)
                    step_embeds, step_positions = embeds, positions
            return torch.stack(new_tokens, dim=1)


def _pick(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
