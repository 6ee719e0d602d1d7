"""The LLM families of the test matrix (tests/test_families.py): for each, the real config class
of the family at a tiny size, the named chat template (seechat/data/chat_templates.py), the
tokenizer's bos/eos, and what the supervised text of an answer must be. One byte-level BPE is
trained once per session; each family's tokenizer wraps a copy of it with the family's special
tokens, and `seechat.models.llm.load_tokenizer` adds the template's control tokens, as it does
for a user's tokenizer that ships no template."""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "What colour is the shape? red. What shape is in the image? a small circle.",
    "Is there a blue triangle? yes. Answer briefly. Be brief. and the other one? blue.",
    "Describe the picture. A gray square sits next to a green circle on white.",
] * 20

# bos/eos/pad of every family: plain special tokens of the base tokenizer.
BASE_SPECIALS = ["<s>", "</s>", "<|endoftext|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
                 "<bos>", "<eos>", "<pad>", "<|END_OF_TURN_TOKEN|>"]


@functools.lru_cache(maxsize=1)
def _trained() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=BASE_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


@dataclass(frozen=True)
class Family:
    name: str
    model_type: str  # AutoConfig.for_model's name of the family's config class
    template: str  # a name in CHAT_TEMPLATES
    eos: str
    end: str  # the end token the template writes after an answer (generation stops there)
    bos: str | None = None
    pad: str | None = None
    lead: str = ""  # what the template writes between the generation prompt and the answer
    tail: str = ""  # what it writes between the answer and the end token
    config: dict[str, Any] = field(default_factory=dict)  # the family's own config values
    llava: bool = True  # Llava (lm_head straight on the decoder) can express it
    slow: bool = False

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The family's tokenizer before seechat loads it: no chat template, no control tokens."""
        return PreTrainedTokenizerFast(tokenizer_object=copy.deepcopy(_trained()), bos_token=self.bos,
                                       eos_token=self.eos, pad_token=self.pad)

    def llm_config(self, vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
        """`llm.config`-style values of a tiny random-init LM of this family (hidden 64, 2 layers)."""
        return {
            "model_type": self.model_type, "vocab_size": vocab_size, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 512,
            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, **self.config,
        }


FAMILIES = [
    # Llama 2 writes `' ' + answer + ' ' + eos`: the space before `</s>` and `</s>` are the model's.
    Family("llama2", "llama", "llama2", eos="</s>", end="</s>", bos="<s>", lead=" ", tail=" "),
    Family("llama3", "llama", "llama3", eos="<|end_of_text|>", end="<|eot_id|>", bos="<|begin_of_text|>",
           config={"rope_theta": 500000.0}),
    Family("mistral", "mistral", "mistral", eos="</s>", end="</s>", bos="<s>", config={"sliding_window": None}),
    Family("qwen2", "qwen2", "qwen2", eos="<|im_end|>", end="<|im_end|>", pad="<|endoftext|>"),
    Family("qwen3", "qwen3", "qwen3", eos="<|im_end|>", end="<|im_end|>", pad="<|endoftext|>",
           config={"head_dim": 16}),
    # Gemma 2 soft-caps its logits (30 in the released configs) and ends turns with
    # <end_of_turn>, not its eos.
    Family("gemma2", "gemma2", "gemma", eos="<eos>", end="<end_of_turn>", bos="<bos>", pad="<pad>",
           config={"head_dim": 16, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                   "query_pre_attn_scalar": 16, "sliding_window": 64}, llava=False),
    Family("gemma3", "gemma3_text", "gemma", eos="<eos>", end="<end_of_turn>", bos="<bos>", pad="<pad>",
           config={"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64}),
    Family("phi3", "phi3", "phi3", eos="<|endoftext|>", end="<|end|>", config={"original_max_position_embeddings": 512}),
    Family("smollm2", "llama", "smollm2", eos="<|im_end|>", end="<|im_end|>", pad="<|endoftext|>",
           config={"tie_word_embeddings": True}),
    # Granite divides its logits by logits_scaling and scales embeddings, residuals and attention.
    Family("granite", "granite", "granite", eos="<|end_of_text|>", end="<|end_of_text|>", pad="<pad>",
           config={"logits_scaling": 8.0, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                   "attention_multiplier": 0.0625}, llava=False),
    Family("olmo2", "olmo2", "olmo2", eos="<|endoftext|>", end="<|endoftext|>", bos="<|endoftext|>", pad="<pad>"),
    # Cohere multiplies its logits by logit_scale.
    Family("cohere", "cohere", "cohere", eos="<|END_OF_TURN_TOKEN|>", end="<|END_OF_TURN_TOKEN|>", bos="<s>",
           pad="<pad>", config={"logit_scale": 0.25}, llava=False),
]
BY_NAME = {f.name: f for f in FAMILIES}

SAMPLE = {
    "id": "colours",
    "images": ["img.png"],
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "<image>\nWhat colour is the shape?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "and the other one?"},
        {"from": "gpt", "value": "a small circle"},
    ],
}
ANSWERS = ["red", "a small circle"]
