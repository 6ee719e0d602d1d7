"""The early-fusion model (Chameleon-style): one decoder-only LM over text ids and image codes.

An image enters as `<im_start> c_1 ... c_n <im_end>`, where c_i are its VQ codes shifted past the
text vocabulary (`vocab.CodeVocab`). The data path is the stitched one unchanged: the tokenizer
has the boundary tokens, so every `<image>` becomes `<im_start>`, `n` placeholders, `<im_end>`,
and this model swaps the placeholders for the image's code ids (`spliced_ids`) before the LM
sees them. Images in assistant turns (text -> image samples, "draw a red circle") are
supervised: their codes and boundary tokens are the targets; images in user turns at
`model.native.user_image_weight`, and drawings lose their prompt at `cfg_dropout` (targets.py).
The LM grows a text LM (`model.native.init_from`, extend.py) or starts from scratch. Everything
else - the loop, evaluation, `chat` - is `SeeChatVLM`'s; answers are text ids only, drawings and
mixed replies come from sampling.py (boundary tokens switch modes, classifier-free guidance).

Chameleon's stabilisers are recipe switches under `model.native`: `qk_norm` (the Qwen3 LM
normalises queries and keys per head; `false` replaces those norms by identities), `z_loss`
(added to the chunked loss, seechat/models/loss.py), `attention_dropout` and `hidden_dropout` (dropout
on the output of every attention and feed-forward block, before the residual add).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from seechat.data import VLMCollator, encode_prompt
from seechat.data.tokenization import IGNORE_INDEX, boundary_ids
from seechat.errors import RecipeError
from seechat.models.llm import load_llm, load_tokenizer
from seechat.models.base import SeeChatVLM
from seechat.models.modes import apply_modes
from seechat.models.native.sampling import decode_native, split_reply
from seechat.models.native.targets import (assistant_image_labels, drop_conditions, user_image_labels,
                                           weighted_lm_loss)
from seechat.models.native.extend import extend_vocabulary, trained_rows
from seechat.models.native.vocab import CodeVocab
from seechat.models.native.vq import VQTokenizer, to_pil

class NativeVLM(SeeChatVLM):
    kind = "native"
    # The VQ tokenizer is trained beforehand (`train_vq`) and never trains with the LM.
    parts = {"vq": ("frozen",), "llm": ("full", "frozen")}

    def __init__(self, config: dict, vq: VQTokenizer, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__(config, tokenizer, vq=vq, llm=llm)
        bounds = boundary_ids(tokenizer)
        if bounds is None:
            raise ValueError("the native tokenizer needs image boundary tokens (load it with image_boundary_tokens)")
        self.boi_id, self.eoi_id = bounds
        self.vocab = CodeVocab(offset=len(tokenizer), size=vq.codebook_size)
        rows = llm.get_input_embeddings().weight.shape[0]
        if rows != self.vocab.vocab_size:
            raise ValueError(f"native LM has {rows} vocabulary rows; text ({len(tokenizer)}) + codebook "
                             f"({vq.codebook_size}) needs {self.vocab.vocab_size}")
        self.z_loss = float(config["native"].get("z_loss") or 0.0)
        self.user_image_weight = float(config["native"].get("user_image_weight") or 0.0)
        self.cfg_dropout = float(config["native"].get("cfg_dropout") or 0.0)
        if self.user_image_weight < 0 or not 0 <= self.cfg_dropout <= 1:
            raise RecipeError(f"model.native.user_image_weight={self.user_image_weight} must be >= 0 and "
                             f"model.native.cfg_dropout={self.cfg_dropout} in [0, 1]")
        reply = config["native"].get("reply_image_weight")
        self.reply_image_weight = 1.0 if reply is None else float(reply)
        if self.reply_image_weight < 0:
            raise RecipeError(f"model.native.reply_image_weight={self.reply_image_weight} must be >= 0 "
                              "(1: a drawing's codes weigh as much as a text token)")
        # The dropped condition: every prompt position of a drawing becomes this id (targets.py).
        self.null_id = tokenizer.pad_token_id
        text = ~self.vocab.code_mask()
        text[[self.image_token_id, self.boi_id, self.eoi_id]] = False
        self.register_buffer("text_ids", text, persistent=False)
        self.register_buffer("code_ids", self.vocab.code_mask(), persistent=False)

    @property
    def num_image_tokens(self) -> int:
        """Placeholders per image at tokenisation: one per code (the boundary tokens come on top)."""
        return self.vq.num_codes

    @property
    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        return self.vq.transform

    @property
    def positions_per_image(self) -> int:
        return self.vq.num_codes + 2

    def _save_parts(self, tmp: Path, standalone: bool) -> dict[str, Any]:
        """Self-contained: the VQ tokenizer is small and the LM trained in full (or from scratch)."""
        self.vq.save_pretrained(tmp / "vq")
        self.base_llm.save_pretrained(tmp / "llm")
        return {"vq": "vq", "llm": "llm"}

    def cached_encoder(self) -> tuple[nn.Module, str]:
        """The frozen VQ as the feature cache's encoder: an image's stored "features" are its codes."""
        return _Codes(self.vq), "frozen"

    # ------------------------------------------------------------------ images as ids
    def spliced_ids(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                    num_images: torch.Tensor | None = None, sample_ids: Sequence[str] | None = None,
                    codes: torch.Tensor | None = None) -> torch.Tensor:
        """`input_ids` with each image's placeholder run replaced by the image's code ids (from
        its pixels, or `codes` [num_images, num_codes] from the feature cache)."""
        is_image = input_ids == self.image_token_id
        n, per_sample = self.num_image_tokens, is_image.sum(dim=1)
        if codes is not None and codes.shape[1:] != (n,):
            raise ValueError(f"cached codes of shape {tuple(codes.shape[1:])} per image; this VQ makes ({n},): "
                             "delete the feature cache")
        images = codes if codes is not None else pixel_values
        given = 0 if images is None else images.shape[0]
        counts = per_sample // n if num_images is None else torch.as_tensor(num_images, device=input_ids.device)
        bad = ((per_sample != counts * n).nonzero().flatten().tolist() or
               ([0] if int(counts.sum()) != given else []))
        if bad:
            i = bad[0]
            name = sample_ids[i] if sample_ids is not None else f"batch index {i}"
            raise ValueError(f"sample {name}: {int(per_sample[i])} image placeholder ids for {int(counts[i])} "
                             f"image(s) x {n} codes (batch: {given} images given); tokenise with the "
                             "native model's num_image_tokens")
        if given == 0:
            return input_ids
        codes = self.vq.encode(pixel_values) if codes is None else codes.long()
        return input_ids.masked_scatter(is_image, self.vocab.to_ids(codes).to(input_ids.device).reshape(-1))

    def embed(self, input_ids, pixel_values=None, num_images=None, sample_ids=None, image_features=None):
        """`image_features`: the images' VQ codes (`cached_encoder`) instead of their pixels."""
        return self.llm.get_input_embeddings()(
            self.spliced_ids(input_ids, pixel_values, num_images, sample_ids, codes=image_features))

    def image_labels(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`labels` with every image of an assistant turn supervised (boundary tokens and codes).

        The tokenizer leaves all image positions at -100; an image belongs to an assistant turn
        exactly when the token after its `<im_end>` is supervised (the rest of the reply, or the
        end-of-turn token, which is always a target)."""
        return assistant_image_labels(ids, labels, self.boi_id, self.positions_per_image)

    def supervised_labels(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Placeholders sit where the codes go, between the same boundary tokens.
        labels = self.image_labels(input_ids, labels)
        if self.user_image_weight > 0:
            user = user_image_labels(input_ids, labels, self.boi_id, self.positions_per_image)
            labels = torch.where(user != IGNORE_INDEX, user, labels)
        return labels

    # ------------------------------------------------------------------ training
    def forward(self, input_ids, attention_mask=None, pixel_values=None, num_images=None, labels=None,
                sample_ids=None, image_features=None, position_ids=None) -> CausalLMOutputWithPast:
        """As `SeeChatVLM.forward`; the loss adds `model.native.z_loss` x mean(logsumexp^2).
        Training drops a drawing's prompt at `cfg_dropout`; the codes of images in user turns are
        targets at weight `user_image_weight` (0: they are not, exactly as before), those of
        images in replies (boundaries and codes) at `reply_image_weight` (1: as text tokens)."""
        ids = self.spliced_ids(input_ids, pixel_values, num_images, sample_ids, codes=image_features)
        if labels is None:
            return self.llm(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        targets = self.image_labels(ids, labels)
        if self.training and self.cfg_dropout > 0:
            ids = drop_conditions(ids, labels, targets, self.boi_id, self.null_id, self.cfg_dropout,
                                  attention_mask, position_ids)
        inputs = dict(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids)
        sets = [(targets, 1.0)]
        if self.reply_image_weight != 1.0:  # text targets at 1, the drawings' image tokens apart
            sets = [(labels, 1.0), (torch.where(labels == IGNORE_INDEX, targets, IGNORE_INDEX), self.reply_image_weight)]
        if self.user_image_weight > 0:
            sets.append((user_image_labels(ids, targets, self.boi_id, self.positions_per_image), self.user_image_weight))
        if len(sets) > 1:  # a set without targets leaves the weighted mean as the others make it
            sets = [(t, w) for t, w in sets if (t != IGNORE_INDEX).any()]
        if len(sets) <= 1 and all(w == 1.0 for _, w in sets):  # one plain set: the fused loss of those labels
            return self._lm_loss(sets[0][0] if sets else targets, self.z_loss, **inputs)
        return weighted_lm_loss(self.base_llm, sets, self.z_loss, **inputs)

    # ------------------------------------------------------------------ generation
    def generate(self, *args: Any, allowed_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """`SeeChatVLM.generate`, emitting text ids only unless `allowed_ids` says otherwise."""
        return super().generate(*args, allowed_ids=self.text_ids if allowed_ids is None else allowed_ids, **kwargs)

    def draw_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Left-padded "draw ..." prompts: each a user turn, the generation prompt, `<im_start>`."""
        rows = [{"id": str(i), "input_ids": torch.tensor(
            encode_prompt([{"from": "human", "value": p}], self.tokenizer, self.num_image_tokens) + [self.boi_id])}
            for i, p in enumerate(prompts)]
        batch = VLMCollator(self.tokenizer.pad_token_id, padding_side="left")(rows)
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}

    @torch.no_grad()
    def generate_images(self, prompts: Sequence[str], temperature: float = 1.0, top_k: int = 0,
                        generator: torch.Generator | None = None, cfg_scale: float = 1.0) -> list[Image.Image]:
        """One image per prompt ("draw a red circle"): `num_codes` sampled code ids after the
        prompt's `<im_start>`, guided at `cfg_scale` (1: none; sampling.py), decoded by the VQ."""
        self.eval()
        batch = self.draw_prompts(prompts)
        out = decode_native(self, batch["input_ids"], batch["attention_mask"], self.vq.num_codes + 1, draw_only=True,
                            cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, generator=generator)
        return to_pil(self.vq.decode(self.vocab.to_codes(out[:, : self.vq.num_codes])))

    @torch.no_grad()
    def mixed_reply(self, prompt: str, images: Sequence = (), max_new_tokens: int = 256, cfg_scale: float = 1.0,
                    temperature: float = 1.0, top_k: int = 0, do_sample: bool = False,
                    generator: torch.Generator | None = None) -> list[str | Image.Image]:
        """A reply that may hold text and images ("draw a red circle, then say what you drew"):
        its parts in order, text as strings and images as PIL images (sampling.py)."""
        self.eval()
        batch = self.prepare([prompt], [list(images)])
        out = decode_native(self, batch["input_ids"], batch["attention_mask"], max_new_tokens, cfg_scale=cfg_scale,
                            temperature=temperature, top_k=top_k, do_sample=do_sample, generator=generator,
                            pixel_values=batch.get("pixel_values"), num_images=batch.get("num_images"))
        parts = split_reply(self, out[0].tolist())
        return [p if isinstance(p, str) else to_pil(self.vq.decode(torch.tensor([p], device=self.device)))[0]
                for p in parts]


class _Codes(nn.Module):
    """A frozen VQ seen as an image encoder (what the feature cache stores): pixels -> codes."""

    def __init__(self, vq: VQTokenizer):
        super().__init__()
        self.vq = vq

    @property
    def transform(self) -> Callable[[Any], torch.Tensor]:
        return self.vq.transform

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vq.encode(pixel_values).to(torch.int32)


# ---------------------------------------------------------------------- building
def configure_llm(llm: PreTrainedModel, native: dict) -> None:
    """Apply the recipe's QK-norm and hidden-dropout switches to a (Qwen3-style) LM in place."""
    layers = llm.get_decoder().layers
    attn = [layer.self_attn for layer in layers]
    has_qk_norm = all(hasattr(a, "q_norm") and hasattr(a, "k_norm") for a in attn)
    if native.get("qk_norm", True) and not has_qk_norm:
        raise ValueError(f"model.native.qk_norm=true but {type(llm).__name__} has no per-head q_norm/k_norm; "
                         "use a Qwen3-style LM (llm.config.model_type: qwen3) or set qk_norm: false")
    if not native.get("qk_norm", True) and has_qk_norm:
        for a in attn:
            a.q_norm, a.k_norm = nn.Identity(), nn.Identity()
    attention_p = float(native.get("attention_dropout") or 0.0)
    llm.config.attention_dropout = attention_p  # saved with the LM
    for a in attn:  # modules copy the config value when built: set it where it is read
        a.attention_dropout = attention_p
    p = float(native.get("hidden_dropout") or 0.0)
    if p > 0:
        def drop(module: nn.Module, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):  # attention returns (output, weights)
                return (F.dropout(output[0], p, module.training), *output[1:])
            return F.dropout(output, p, module.training)

        for layer in layers:
            layer.self_attn.register_forward_hook(drop)
            layer.mlp.register_forward_hook(drop)


def assemble_native(model_cfg: dict[str, Any], vq: VQTokenizer) -> NativeVLM:
    """Tokenizer (with boundary tokens), LM sized text + codebook, stabilisers applied; no modes.

    `model.native.init_from` (a text LM: the stitched recipes' own) is the LM to grow; without
    it the LM is `llm.name_or_path`, or random-init from `llm.config` (from scratch)."""
    cfg = copy.deepcopy(model_cfg)
    native = cfg["native"]
    share = float(native.get("code_init_share") or 0.0)
    word_share = float(native.get("code_word_share") or 0.0)
    for key, value in (("code_init_share", share), ("code_word_share", word_share)):
        if not 0 <= value <= 1:
            raise RecipeError(f"model.native.{key}={value} must lie in [0, 1] (0: plain statistical rows)")
    if word_share and vq.code_words is None:
        raise RecipeError(f"model.native.code_word_share={word_share} needs the VQ's code_words.json "
                          f"(written by `python -m seechat.experiments.native_prepare`); set it to 0 for this VQ")
    llm_cfg = {**cfg["llm"], "image_boundary_tokens": True}
    cfg["llm"]["image_boundary_tokens"] = True
    if native.get("init_from"):
        llm_cfg["name_or_path"] = native["init_from"]
        llm_cfg["tokenizer"] = llm_cfg.get("tokenizer") or native["init_from"]
    tokenizer = load_tokenizer(llm_cfg)
    vocab = CodeVocab(len(tokenizer), vq.codebook_size)
    if not llm_cfg.get("name_or_path"):
        if not llm_cfg.get("config"):
            raise ValueError("the native LM needs model.native.init_from (a text LM to start from), llm.config "
                             "(from scratch, e.g. {model_type: qwen3, hidden_size: 192, ...}) or llm.name_or_path")
        llm_cfg["config"] = {**llm_cfg["config"], "vocab_size": vocab.vocab_size}
    llm = load_llm(llm_cfg, tokenizer)
    grows = llm.get_input_embeddings().weight.shape[0] != vocab.vocab_size  # a text LM: add code rows
    for key, value in (("code_init_share", share), ("code_word_share", word_share)):
        if value and not grows:
            raise RecipeError(f"model.native.{key}={value} shapes the code rows of a grown text LM; "
                              f"set model.native.init_from to one, or {key}: 0 for an LM from scratch")
    if grows:
        # Codes follow the tokenizer's last id; the text rows stay as trained (extend.py).
        keep = trained_rows(llm_cfg["name_or_path"], llm_cfg["tokenizer"] or llm_cfg["name_or_path"],
                            llm_cfg.get("trust_remote_code", False))
        features = vq.code_vectors() if share else None
        words = None
        if word_share:
            ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in vq.code_words["words"]]
            weights = torch.tensor(vq.code_words["weights"])
            if weights.shape != (vq.codebook_size, len(ids)) or not all(ids):
                raise RecipeError(f"model.native.code_word_share: the VQ's code_words.json does not fit it "
                                  f"({tuple(weights.shape)} weights for {vq.codebook_size} codes and {len(ids)} "
                                  f"words, each with token ids); remake it with native_prepare or set 0")
            words = (ids, weights)
        extend_vocabulary(llm, keep, vocab.vocab_size, code_features=features, share=share,
                          code_words=words, word_share=word_share)
    configure_llm(llm, native)
    return NativeVLM(cfg, vq, llm, tokenizer)


def build_native(model_cfg: dict[str, Any], modes: dict[str, str]) -> NativeVLM:
    """A ready-to-train native model from a recipe's `model` section."""
    if not model_cfg["native"].get("vq"):
        raise ValueError("model.native.vq must name a saved VQ tokenizer directory "
                         "(seechat.models.native.vq.VQTokenizer.save_pretrained; `python -m seechat.experiments.native_prepare` makes one)")
    model = assemble_native(model_cfg, VQTokenizer.from_pretrained(model_cfg["native"]["vq"]))
    apply_modes(model, modes)
    return model
