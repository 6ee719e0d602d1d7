"""What every seechat model kind shares: its parts, the tokenizer, the LM loss and the generation loop.

A kind (stitched, native; registered in `kinds.py`) subclasses `SeeChatVLM` and declares
`parts`: each named sub-module with the modes it may train in (prismatic's `all_module_keys`),
so that modes, parameter tables and the training loop iterate over parts and need no special
case per kind. A kind says how ids and images become input embeddings (`embed`), how many
placeholders an image takes (`num_image_tokens`), which pixels its image part wants
(`image_transform`) and which files it saves (`_save_parts`); the rest is here.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from seechat.data.tokenization import stop_token_ids
from seechat.models.llm import IMAGE_TOKEN
from seechat.models.loss import supervised_lm_loss
from seechat.models.prompting import decode, prepare, reply, user_text
from seechat.models.saved import META, write_meta, writing_dir
from seechat.precision import reuse_autocast_casts

# Recent transformers 5 releases rename the forward's `past_key_values` to `cache` and warn on
# every call (generate's loop here) that uses the old name; `transformers>=5` releases before the
# rename accept only the old one. Peft reads the deprecated `is_gradient_checkpointing` when it
# wraps or loads LoRA. Neither warning is the user's to act on.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class SeeChatVLM(nn.Module):
    """A vision-language model over a causal LM (`llm`) and its tokenizer."""

    kind: ClassVar[str]
    # part name -> the modes it may train in (the first is the stage default for a part no
    # stage names); every part is an attribute of the model.
    parts: ClassVar[dict[str, tuple[str, ...]]]

    def __init__(self, config: dict, tokenizer: PreTrainedTokenizerBase, **parts: nn.Module):
        super().__init__()
        self.config = config
        # Registered in the declared order, so `parameters()` walks the parts as `parts` lists
        # them: the gradient norm that clipping and the guard use sums its per-tensor norms in
        # that order (registering the LM first changed its last bit, and the finetune's answers).
        for name in self.parts:
            setattr(self, name, parts[name])
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.modes: dict[str, str] = {}

    # ------------------------------------------------------------------ structure
    @property
    def num_image_tokens(self) -> int:
        """Placeholder tokens per image: what `<image>` expands to at tokenisation."""
        raise NotImplementedError

    @property
    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image -> the pixel tensor the model's image part reads."""
        raise NotImplementedError

    def cached_encoder(self) -> tuple[nn.Module, str] | None:
        """(module, mode): what `data.feature_cache` may store the outputs of, on the transformed
        pixels (`module.transform`), and whether it trains; `embed` takes them as `image_features`.
        None: this kind has nothing to cache."""
        return (self.encoder, self.modes.get("encoder", "frozen")) if "encoder" in self.parts else None

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

    def part(self, name: str) -> nn.Module:
        return getattr(self, name)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str, standalone: bool = False) -> None:
        """Write the model to `directory` (written beside it, then renamed into place).
        `standalone=True` stores every part's weights instead of references to frozen experts
        (what `seechat merge` writes: a checkpoint that needs nothing else)."""
        with writing_dir(directory, META) as tmp:
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            stored = {"tokenizer": "tokenizer", **self._save_parts(tmp, standalone)}
            write_meta(tmp, {**self.config, "kind": self.kind}, self.modes, stored)

    def _save_parts(self, tmp, standalone: bool) -> dict[str, Any]:
        """Write the parts' files into `tmp`; returns seechat.json's "stored" entries."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              num_images: torch.Tensor | None = None, sample_ids: Sequence[str] | None = None,
              image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings with each image's placeholders filled in."""
        raise NotImplementedError

    def supervised_labels(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The labels the loss averages over (the training loop weights batches by their count)."""
        return labels

    def _lm_loss(self, labels: torch.Tensor, z_loss: float = 0.0, **inputs) -> CausalLMOutputWithPast:
        """The LM's decoder on `inputs`, then head (+ the family's logit transform) + loss at the
        supervised positions only (see seechat/models/loss.py)."""
        return CausalLMOutputWithPast(loss=supervised_lm_loss(self.base_llm, labels, z_loss, **inputs))

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
        images = list(images or []) + ([image] if image is not None else [])
        turn = {"from": "human", "value": user_text(prompt, len(images))}
        return reply(self, [turn], images, max_new_tokens, on_text, **sampling).text

    def prepare(self, prompts: Sequence[str], images: Sequence[Sequence] | None = None) -> dict:
        """A left-padded batch of single-turn prompts for `generate(**batch)`; `images[i]` is
        the list of images of prompt i. See seechat/models/prompting.py."""
        return prepare(self, prompts, images)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """`generate`'s output as answer strings."""
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
            # eos and the template's end-of-turn token (Gemma's <end_of_turn>, Llama 3's <|eot_id|>)
            eos = eos_token_id if eos_token_id is not None else stop_token_ids(self.tokenizer)
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
