"""A model of the easy-VQA default's exact shape, built in seconds: the demo LM's config and
tower (seechat/experiments/easyvqa/experts.py: vision_config, SigLIP-shaped with 16-px patches,
16 image tokens, no CLS) at random init, stitched by the default recipe
(recipes/easyvqa_align.yaml), with the adapter randomised. Used by the export tests (llava-hf,
GGUF, vLLM)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForCausalLM, AutoProcessor, CLIPImageProcessor, LlavaForConditionalGeneration, SiglipVisionConfig, SiglipVisionModel
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from seechat import build_model, resources
from seechat.config import load_recipe
from seechat.experiments.easyvqa.experts import COLORS, IMAGE_SIZE, SHAPES, llm_config, vision_config
from seechat.experiments.tiny import train_tokenizer
from seechat.models.kinds import stage_modes

QUESTIONS = ["What color is the shape?", "What shape is in the image?", "Is there a red shape?",
             "Does the image not contain a circle?"]
CORPUS = [f"{c} {s}\n{q}" for c in COLORS for s in SHAPES for q in QUESTIONS] + list(COLORS + SHAPES) + \
    ["yes", "no", "user\n", "assistant\n"] * 20


def default_shaped_model(root: Path, seed: int = 0) -> Path:
    """Experts of the demo's shapes under root/experts, the stitched model saved to root/model."""
    torch.manual_seed(seed)
    experts = root / "experts"
    tokenizer = train_tokenizer(CORPUS, vocab_size=300, template="chatml")
    # Drawn with SigLIP's pooling head and then saved without it (the default has none), so the
    # random LM drawn next is the one the engine tests (GGUF, vLLM) were checked on: its greedy
    # tokens after the first are near-ties (and partial UTF-8 bytes) that another draw can flip.
    with_head = SiglipVisionModel(SiglipVisionConfig(**{**vision_config().to_dict(), "vision_use_head": True}))
    with torch.random.fork_rng():  # its own init draws nothing from the stream the LM reads
        tower = SiglipVisionModel(vision_config())
    tower.load_state_dict({k: v for k, v in with_head.state_dict().items() if not k.startswith("vision_model.head.")
                           and not k.startswith("head.")})
    tower.save_pretrained(experts / "vision")
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                       image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD)).save_pretrained(experts / "vision")
    llm = AutoModelForCausalLM.from_config(llm_config(len(tokenizer)), attn_implementation="eager")
    llm.save_pretrained(experts / "llm")
    tokenizer.save_pretrained(experts / "llm")
    recipe = load_recipe(resources.recipe_file("easyvqa_align.yaml"),
                         [f"model.encoder.name={experts / 'vision'}", f"llm.name_or_path={experts / 'llm'}"])
    model = build_model(recipe["model"], stage_modes("align", recipe["model"]))
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(root / "model")
    return root / "model"


def shape_images(root: Path, n: int) -> list[tuple[str, str]]:
    """n (64x64 png path, question) pairs: one coloured shape on white each, as easy-VQA draws."""
    root.mkdir(parents=True, exist_ok=True)
    palette = [(220, 30, 30), (30, 160, 40), (30, 60, 220), (10, 10, 10), (128, 128, 128), (0, 128, 128),
               (140, 80, 20), (230, 220, 30)]
    out = []
    for i in range(n):
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
        x, y, r = 8 + (i * 7) % 24, 10 + (i * 5) % 20, 12 + i % 9
        box, color = [x, y, x + 2 * r, y + 2 * r], palette[i % len(palette)]
        draw = ImageDraw.Draw(image)
        [draw.ellipse, draw.rectangle, lambda b, fill: draw.polygon([(b[0], b[3]), (b[2], b[3]), ((b[0] + b[2]) // 2, b[1])], fill=fill)][i % 3](box, fill=color)
        path = root / f"img{i}.png"
        image.save(path)
        out.append((str(path), QUESTIONS[i % len(QUESTIONS)]))
    return out


def seechat_answers(model, pairs: list[tuple[str, str]], max_new_tokens: int = 4, batch_size: int = 32) -> list[str]:
    """Greedy answers, batched, through the same prepare -> generate -> decode path `seechat eval` uses."""
    answers = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i: i + batch_size]
        batch = model.prepare([q for _, q in chunk], images=[[p] for p, _ in chunk])
        with torch.no_grad():
            answers += model.decode(model.generate(**batch, max_new_tokens=max_new_tokens))
    return [a.strip() for a in answers]


def llava_answers(out_dir, pairs, max_new_tokens=4):
    """Greedy answers and last-prompt logits of an exported Llava (transformers), one question at a time."""
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


def demo_test_pairs(n: int) -> list[tuple[str, str]] | None:
    """The first n easy-VQA test questions (image path, question) when the demo data is here."""
    test = Path("data/generated/easyvqa/test.json")
    if not test.is_file():
        return None
    rows = json.loads(test.read_text())
    pairs = []
    for row in rows:
        turns = row["conversations"]
        pairs.append((str(test.parent / row["image"]), turns[0]["value"].replace("<image>", "").strip()))
        if len(pairs) == n:
            break
    return pairs
