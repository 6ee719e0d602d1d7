"""The embedded default exports as it is: a model of its exact shape (tower, adapter card, LM)
becomes a stock transformers Llava whose logits and greedy answers are seechat's."""
from __future__ import annotations

import json

import torch

from default_model import default_shaped_model, llava_answers, seechat_answers, shape_images
from seechat import load
from seechat.tools.export import export_llava_hf


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
