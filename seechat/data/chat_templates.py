"""Chat templates that `llm.chat_template` can name, for tokenizers that ship none (base models,
tokenizers trained for a test), written from each family's published prompt format.

`CHAT_TEMPLATES` maps a name to its Jinja template; `TEMPLATE_TOKENS` lists the special tokens
a template writes, which `seechat.models.llm.load_tokenizer` adds (as special tokens) to a
tokenizer that lacks them, so that the end token is one token the model can learn to emit and
generation can stop at. Every template here is prefix-stable (see `template.py`): a turn renders
the same way whatever follows it. docs/families.md lists what the tests check for each.
"""

# Llama-2-chat / CodeLlama-instruct: "<s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {answer} </s>"
# and "<s>[INST] {user} [/INST]" for every later exchange. The answer is written
# `' ' + answer.strip() + ' ' + eos`: both spaces and `</s>` are the model's to write.
LLAMA2_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = '<<SYS>>\n' + messages[0]['content'].strip() + '\n<</SYS>>\n\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Llama-2 turns alternate user, assistant, user, ... after an optional system turn') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'].strip() + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)

# Llama 3 / 3.x instruct: a header per turn, "<|eot_id|>" ends every turn.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)

# Mistral instruct (v0.1-v0.3): "<s>[INST] {user} [/INST]{answer}</s>[INST] {user} [/INST]"; a
# system prompt goes in front of the first user message.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Mistral turns alternate user, assistant, user, ... after an optional system turn') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- else -%}{{ message['content'] + eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)


def _chatml(default_system: str | None = None) -> str:
    """ChatML ("<|im_start|>{role}\\n{content}<|im_end|>\\n"), with the family's default system
    prompt when the conversation has none."""
    system = (
        "{%- if not messages or messages[0]['role'] != 'system' -%}"
        "{{ '<|im_start|>system\n" + default_system + "<|im_end|>\n' }}{%- endif -%}"
        if default_system else ""
    )
    return (
        system
        + "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


# ChatML as Qwen2 writes it; the generation prompt ends with "assistant\n".
CHATML_TEMPLATE = _chatml()

# Qwen3: ChatML with a <think> block in each assistant turn. Answers without reasoning get the
# empty block "<think>\n\n</think>\n\n" that Qwen3 writes in non-thinking mode, in every turn (so
# multi-turn samples render each turn the same way). The generation prompt holds that empty block
# too (non-thinking mode, the model answers at once) unless `enable_thinking=True` is passed.
QWEN3_TEMPLATE = (
    "{% for message in messages %}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- else -%}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif -%}"
    "{% endfor %}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}"
    "{%- if not enable_thinking is defined or not enable_thinking -%}{{ '<think>\n\n</think>\n\n' }}{%- endif -%}"
    "{%- endif -%}"
)

# Gemma 2 / Gemma 3: "<start_of_turn>user\n...<end_of_turn>\n<start_of_turn>model\n...<end_of_turn>\n";
# no system role: a system prompt goes in front of the first user message.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (system if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# Phi-3 / Phi-3.5: "<|user|>\n{user}<|end|>\n<|assistant|>\n{answer}<|end|>\n".
PHI3_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)

# IBM Granite 3.x: "<|start_of_role|>{role}<|end_of_role|>{content}<|end_of_text|>\n".
GRANITE_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif -%}"
)

# OLMo 2 instruct (Tulu format): "<|user|>\n{user}\n<|assistant|>\n{answer}<|endoftext|>\n".
OLMO2_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{%- else -%}{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)

# Cohere Command-R: role tokens inside "<|START_OF_TURN_TOKEN|>...<|END_OF_TURN_TOKEN|>".
COHERE_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = {'system': '<|SYSTEM_TOKEN|>', 'user': '<|USER_TOKEN|>', 'assistant': '<|CHATBOT_TOKEN|>'}[message['role']] -%}"
    "{{ '<|START_OF_TURN_TOKEN|>' + role + message['content'] + '<|END_OF_TURN_TOKEN|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{%- endif -%}"
)

# Vicuna v1 (LLaVA-1.5's conversation format), for base tokenizers that ship no template.
VICUNA_TEMPLATE = (
    "{{ bos_token }}A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ ' USER: ' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ASSISTANT: ' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)

_CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

CHAT_TEMPLATES = {
    "chatml": CHATML_TEMPLATE,
    "qwen2": _chatml("You are a helpful assistant."),
    "qwen2.5": _chatml("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "qwen3": QWEN3_TEMPLATE,
    "smollm2": _chatml("You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
    "llama2": LLAMA2_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "mistral": MISTRAL_TEMPLATE,
    "gemma": GEMMA_TEMPLATE,
    "phi3": PHI3_TEMPLATE,
    "granite": GRANITE_TEMPLATE,
    "olmo2": OLMO2_TEMPLATE,
    "cohere": COHERE_TEMPLATE,
    "vicuna": VICUNA_TEMPLATE,
}

# The special tokens each template writes itself (bos/eos come from the tokenizer).
TEMPLATE_TOKENS = {
    "chatml": _CHATML_TOKENS,
    "qwen2": _CHATML_TOKENS,
    "qwen2.5": _CHATML_TOKENS,
    "qwen3": _CHATML_TOKENS,
    "smollm2": _CHATML_TOKENS,
    "llama2": (),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": (),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "phi3": ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "granite": ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"),
    "olmo2": ("<|system|>", "<|user|>", "<|assistant|>"),
    "cohere": ("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>",
               "<|CHATBOT_TOKEN|>"),
    "vicuna": (),
}
