"""lmms-eval hooks for the `seechat_easyvqa` task (seechat_easyvqa.yaml beside this file).

lmms-eval imports this file from its own environment, without seechat, so the answer
normalisation of `seechat.inference.evaluate.normalize_answer` is restated here (the test
tests/test_lmms_eval.py checks that both score the same questions the same way).
"""
from __future__ import annotations

import os
import re
import string

from PIL import Image

# Where the prepared files lie, relative to the directory lmms-eval runs in (the YAML's data_files).
ROOT = "data/generated/easyvqa"
IMAGE = "<image>"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_NUMBERS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def normalize_answer(text: str) -> str:
    """VQA-style: lower case, no punctuation, no articles, number words as digits, single spaces."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(_NUMBERS.get(word, word) for word in text.split())


def _turns(doc: dict) -> tuple[str, str]:
    """The question (last human turn) and the reference (the gpt turn after it)."""
    turns = doc["conversations"]
    last = max(i for i, t in enumerate(turns) if t["from"] == "gpt")
    return turns[last - 1]["value"], turns[last]["value"]


def doc_to_visual(doc: dict) -> list:
    return [Image.open(os.path.join(ROOT, doc["image"])).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    # the server puts the image first, as the prepared turn "<image>\nquestion" does
    return _turns(doc)[0].replace(IMAGE, "").strip()


def doc_to_target(doc: dict) -> str:
    return _turns(doc)[1]


def process_results(doc: dict, results: list) -> dict:
    prediction = (results[0] if results else "").strip()
    return {"exact_match": float(normalize_answer(prediction) == normalize_answer(doc_to_target(doc)))}
