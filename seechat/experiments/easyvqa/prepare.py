"""Turn the `easy-vqa` PyPI package into LLaVA JSON + images for seechat's embedded default.

    python data/prepare_easyvqa.py [--out data/generated/easyvqa]      (a checkout)
    python -m seechat.experiments.easyvqa.prepare [--out ...]          (anywhere)

Writes (idempotent; the folder is git-ignored):
  images/{train,test}/<id>.png   copies of the package's 64x64 images
  train.json / val.json          one question per sample; val = 5% of the training IMAGES
                                 (seeded), so no val image is ever trained on
  train_multiturn.json           the training questions grouped by image into conversations of
                                 up to 10 turns (seeded random order): each image is encoded once
                                 per ~8 answers, and sequences stay short (attention is quadratic)
  train_balanced.json            what the default recipes train on: single questions, where
                                 each yes/no family (color or shape, plain or negated) has as
                                 many "yes" as "no" answers (the majority answer is subsampled,
                                 a fresh draw per pass, 2 passes). Without it the majority
                                 answer (~87% "no" for "is there a <color> shape?") is a prior
                                 the model settles on instead of looking at the image.
  test.json                      the official test split (9,673 questions), never trained on
  answers.json                   the answer vocabulary
  prepared_by.json               the sha256 of this module (the demo re-prepares when it changes)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path

VAL_FRACTION = 0.05
TURNS_PER_SAMPLE = 10


def _sample(split: str, index: int, image_id: int, question: str, answer: str) -> dict:
    return {
        "id": f"{split}-{index}",
        "image": f"images/{split}/{image_id}.png",
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }


COLORS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}


def yes_no_family(sample: dict) -> str | None:
    """'color' / 'shape' (+ ' negated') for a yes/no question, None for a what-question."""
    answer = sample["conversations"][1]["value"]
    if answer not in ("yes", "no"):
        return None
    words = sample["conversations"][0]["value"].rstrip("?").split()
    kind = "color" if COLORS & set(words) else "shape"
    return kind + (" negated" if "not" in words or "no" in words else "")


def balanced(samples: list[dict], seed: int, passes: int = 2) -> list[dict]:
    """`passes` shuffled draws in which every yes/no family has equal yes and no counts."""
    rng = random.Random(seed)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for s in samples:
        family = yes_no_family(s)
        groups[(family, s["conversations"][1]["value"] if family else None)].append(s)
    out = []
    for _ in range(passes):
        draw = list(groups[(None, None)])
        for family in sorted({f for f, _ in groups if f}):  # sorted: set order varies per process
            yes, no = groups[(family, "yes")], groups[(family, "no")]
            n = min(len(yes), len(no))
            draw += rng.sample(yes, n) + rng.sample(no, n)
        rng.shuffle(draw)
        out += draw
    return out


def _copy_images(paths: dict[int, str], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for image_id, src in paths.items():
        target = dest / f"{image_id}.png"
        if not target.is_file():
            shutil.copyfile(src, target)


def multiturn(samples: list[dict], seed: int, turns: int = TURNS_PER_SAMPLE) -> list[dict]:
    """Group single-question samples by image into conversations of at most `turns` questions."""
    by_image: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        by_image[s["image"]].append(s)
    rng = random.Random(seed)
    out = []
    for image, group in by_image.items():
        group = list(group)
        rng.shuffle(group)
        chunks = -(-len(group) // turns)  # as even as possible: 7 questions -> 4 + 3
        for c in range(chunks):
            conversation = []
            for k, s in enumerate(group[c::chunks]):
                question = s["conversations"][0]["value"]
                if k:  # the image marker only in the first turn
                    question = question.replace("<image>\n", "")
                conversation += [{"from": "human", "value": question}, s["conversations"][1]]
            out.append({"id": f"img-{Path(image).stem}-{c}", "image": image, "conversations": conversation})
    return out


def script_digest() -> str:
    """The sha256 of this module: which version of the preparation wrote a folder."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def prepare(out: Path, seed: int = 0) -> dict[str, int]:
    """Write the files listed in the module docstring into `out`; returns each file's length."""
    import easy_vqa

    out.mkdir(parents=True, exist_ok=True)
    _copy_images(easy_vqa.get_train_image_paths(), out / "images" / "train")
    _copy_images(easy_vqa.get_test_image_paths(), out / "images" / "test")

    questions, answers, image_ids = easy_vqa.get_train_questions()
    train_images = sorted(set(image_ids))
    val_images = set(random.Random(seed).sample(train_images, int(len(train_images) * VAL_FRACTION)))
    train, val = [], []
    for i, (q, a, img) in enumerate(zip(questions, answers, image_ids)):
        (val if img in val_images else train).append(_sample("train", i, img, q, a))
    tq, ta, tid = easy_vqa.get_test_questions()
    test = [_sample("test", i, img, q, a) for i, (q, a, img) in enumerate(zip(tq, ta, tid))]

    files = {"train.json": train, "val.json": val, "test.json": test,
             "train_multiturn.json": multiturn(train, seed), "train_balanced.json": balanced(train, seed),
             "answers.json": sorted(easy_vqa.get_answers())}
    for name, content in files.items():
        (out / name).write_text(json.dumps(content))
    # Written last: which version of this module made the files (the demo re-prepares when the
    # module has changed since, rather than train on files an older version wrote).
    (out / "prepared_by.json").write_text(json.dumps({"script_sha256": script_digest(), "seed": seed}))
    return {name: len(content) for name, content in files.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/generated/easyvqa"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = prepare(args.out, args.seed)
    print(json.dumps({"out": str(args.out), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
