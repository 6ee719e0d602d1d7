"""Prepare the LLaVA JSON datasets for seechat recipes (run where the data can be downloaded).

    LLaVA-Pretrain-558K (stage 1, align):
        huggingface-cli download liuhaotian/LLaVA-Pretrain --repo-type dataset \
            --local-dir data/generated/llava_pretrain
        (cd data/generated/llava_pretrain && mkdir -p images && unzip -q images.zip -d images)
        python data/prepare_llava.py --json data/generated/llava_pretrain/blip_laion_cc_sbu_558k.json \
            --image-root data/generated/llava_pretrain/images
    LLaVA-665K mix (stage 2, finetune): llava_v1_5_mix665k.json from liuhaotian/LLaVA-Instruct-150K,
        images from COCO train2017, GQA, OCR-VQA, TextVQA and Visual Genome laid out as in the
        LLaVA repository's docs under data/generated/llava_665k/images, then
        python data/prepare_llava.py --json data/generated/llava_665k/llava_v1_5_mix665k.json \
            --image-root data/generated/llava_665k/images

Each record is checked the way training will read it (schema, `<image>` count, image file
present); bad records are dropped and listed in `<out>.skipped.jsonl` with the reason, so a run
with `data.on_error: raise` never stops on them. Text-only records (ShareGPT) are kept.
Writes `<json stem>.clean.json` next to the input (or --out).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from seechat.data import SampleError, normalize_sample, read_llava_records, resolve_image_path


def clean(json_path: Path, image_root: Path | None, out: Path, check_images: bool = True) -> Counter:
    read = read_llava_records(json_path, on_error="skip")
    stats: Counter = Counter(read=len(read.records) + len(read.skipped), malformed=len(read.skipped))
    kept, skipped = [], [{"id": loc, "reason": why} for loc, why in read.skipped]
    for index, raw in enumerate(read.records):
        try:
            sample = normalize_sample(raw, index)
            if check_images:
                for image in sample["images"]:
                    if not resolve_image_path(image, image_root).is_file():
                        raise SampleError(sample["id"], f"image file not found: {image}")
        except SampleError as err:
            skipped.append({"id": raw.get("id", index) if isinstance(raw, dict) else index, "reason": str(err)})
            stats["dropped"] += 1
            continue
        stats["images"] += len(sample["images"])
        stats["text_only"] += not sample["images"]
        kept.append(raw)
    out.write_text(json.dumps(kept))
    with open(out.with_suffix(".skipped.jsonl"), "w") as f:
        for row in skipped:
            f.write(json.dumps(row) + "\n")
    stats["kept"] = len(kept)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, type=Path, help="LLaVA JSON/JSONL file")
    parser.add_argument("--image-root", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-image-check", action="store_true", help="skip the per-file existence check")
    args = parser.parse_args(argv)
    out = args.out or args.json.with_name(args.json.stem + ".clean.json")
    stats = clean(args.json, args.image_root, out, not args.no_image_check)
    print(json.dumps({"out": str(out), **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
