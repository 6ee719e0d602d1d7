"""What the experts learn from: question/answer pairs of LLaVA records, the questions whose
answers describe the image, and each image's caption made from those answers.

A question *describes* the image when it is asked about several images and its answers are
class-like: short (at most `SHORT_ANSWER_WORDS` words), not yes/no, at least two distinct values
and at most `MAX_CLASSES`. "what digit is this?" -> "3" describes; "is this an even digit?" ->
"no" does not (its answer means something only together with the question), and neither do
free-form descriptions.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Sequence

from seechat.data import normalize_sample
from seechat.inference.breakdown import SHORT_ANSWER_WORDS, YES_NO, words

MAX_CLASSES = 64
MIN_ASKED = 4  # a describing question is asked about at least this many images


@dataclass
class Pair:
    images: tuple[str, ...]
    question: str
    answer: str


@dataclass
class Corpus:
    pairs: list[Pair]
    # describing question (normalised) -> its distinct answers, most common first
    heads: dict[str, list[str]] = field(default_factory=dict)
    # image -> {describing question: answer}
    labels: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def images(self) -> list[str]:
        return sorted({i for p in self.pairs for i in p.images})

    def caption(self, images: Sequence[str]) -> str:
        """The caption words of `images`: each image's describing answers, in head order."""
        return " ".join(self.labels.get(i, {}).get(q, "") for i in images for q in self.heads).strip()

    def targets(self, images: Sequence[str]) -> list[tuple[list[str], list[int]]]:
        """Per head: its captions and each image's index among them (-100: unknown)."""
        out = []
        for q, answers in self.heads.items():
            index = {a: k for k, a in enumerate(answers)}
            out.append((answers, [index.get(self.labels.get(i, {}).get(q), -100) for i in images]))
        return out


def qa_pairs(records: Sequence[dict]) -> list[Pair]:
    """(images, question, answer) for every human -> gpt turn pair of LLaVA records."""
    out = []
    for index, raw in enumerate(records):
        sample = normalize_sample(raw, index)
        images = tuple(str(i) for i in sample["images"])
        turns = [t for t in sample["conversations"] if t["from"] != "system"]
        for q, a in zip(turns[0::2], turns[1::2]):
            if q["from"] == "human" and a["from"] == "gpt":
                out.append(Pair(images, q["value"].replace("<image>", "").strip(), a["value"].strip()))
    return out


def describing_questions(pairs: Sequence[Pair]) -> dict[str, list[str]]:
    """Describing question (see the module docstring) -> its answers, most common first."""
    answers: dict[str, Counter] = defaultdict(Counter)
    for p in pairs:
        if len(p.images) == 1:
            answers[" ".join(words(p.question))][p.answer] += 1
    heads = {}
    for q, counts in answers.items():
        values = list(counts)
        class_like = all(0 < len(words(a)) <= SHORT_ANSWER_WORDS and a.lower() not in YES_NO for a in values)
        if class_like and 2 <= len(values) <= MAX_CLASSES and sum(counts.values()) >= MIN_ASKED:
            heads[q] = [a for a, _ in counts.most_common()]
    return dict(sorted(heads.items(), key=lambda kv: -sum(answers[kv[0]].values())))


def build_corpus(records: Sequence[dict]) -> Corpus:
    pairs = qa_pairs(records)
    heads = describing_questions(pairs)
    votes: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for p in pairs:
        q = " ".join(words(p.question))
        if len(p.images) == 1 and q in heads:
            votes[p.images[0]][q][p.answer] += 1
    labels = {image: {q: c.most_common(1)[0][0] for q, c in per_q.items()} for image, per_q in votes.items()}
    return Corpus(pairs, heads, labels)
