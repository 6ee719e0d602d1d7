"""The embedded default exports as it is: a model of its exact shape (tower, adapter card, LM)
becomes a stock transformers Llava whose logits and greedy answers are seechat's."""
from __future__ import annotations

import json

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from default_model import default_shaped_model, seechat_answers, shape_images
from seechat import load
from seechat.tools.export import export_llava_hf


def llava_answers(out_dir, pairs, max_new_tokens=4):
    processor = AutoProcessor.from_pretrained(out_dir, backend="pil")
    llava = LlavaForConditionalGeneration.from_pretrained(out_dir).eval()
    answers, logits = [], []
    for path, question in pairs:
        messages = [{"role": "user", "content": [{"type": "image", "path": path}, {"type": "text", "text": question}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            logits.append(llava(**inputs).logits[0, -1])
            tokens = llava.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(processor.decode(tokens[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers, torch.stack(logits)


def test_default_shaped_model_exports_to_llava_with_the_same_answers(tmp_path):
    model_dir = default_shaped_model(tmp_path)
    model = load(model_dir)
    assert model.num_image_tokens == 16  # 4x4 patches of 16 px, no CLS, no pixel shuffle
    assert model.base_llm.config.hidden_size // model.base_llm.config.num_attention_heads == 64  # vLLM CPU: >= 32
    out = export_llava_hf(model_dir, tmp_path / "llava")
    config = json.loads((out / "config.json").read_text())
    assert config["image_seq_length"] == 16 and config["vision_config"]["model_type"] == "siglip_vision_model"
    pairs = shape_images(tmp_path / "images", 12)
    ours = seechat_answers(model, pairs)
    theirs, last_logits = llava_answers(out, pairs)
    assert theirs == ours
    # the next-token logits after each prompt, seechat's own forward
    ref = []
    for path, question in pairs:
        batch = model.prepare([question], images=[[path]])
        with torch.no_grad():
            ref.append(model(batch["input_ids"], pixel_values=batch["pixel_values"],
                             attention_mask=batch["attention_mask"]).logits[0, -1])
    assert (torch.stack(ref) - last_logits).abs().max().item() <= 1e-4
