"""An evaluation that explains itself: accuracy per question group, the commonest confusions
among short answers, and two evaluations side by side (`seechat eval --compare A B`).

A row's group is its record's `type` field when the data has one; otherwise its question with
the variable words normalised: lower case, no punctuation, numbers as `#`, and every word that
is itself a one-word answer somewhere in the data (other than yes/no) as `_`. So easy-VQA's
"is there a red shape?" and "is there a blue shape?" are both "is there a _ shape", while
"what digit is this?" stays itself.
"""
from __future__ import annotations

import json
import re
import string
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from seechat.errors import UserError

_PUNCT = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(r"^\d+(\.\d+)?$")
YES_NO = frozenset({"yes", "no"})
SHORT_ANSWER_WORDS = 3  # answers of at most this many words count as short (class-like)
TOP_CONFUSIONS = 10


def words(text: str) -> list[str]:
    """Lower-case words of `text` without punctuation or `<image>` markers."""
    return text.replace("<image>", " ").lower().translate(_PUNCT).split()


def variable_words(answers: Iterable[str]) -> set[str]:
    """One-word answers other than yes/no: the words a question template varies over."""
    out = set()
    for answer in answers:
        w = words(answer)
        if len(w) == 1 and w[0] not in YES_NO:
            out.add(w[0])
    return out


def question_group(question: str, variable: set[str]) -> str:
    """`question` with numbers as `#` and the `variable` words as `_` (see the module docstring)."""
    return " ".join("#" if _NUMBER.match(w) else "_" if w in variable else w for w in words(question))


def group_rows(rows: Sequence[dict]) -> list[str]:
    """The group of each evaluation row: its `type`, or its normalised question."""
    variable = variable_words(row["answer"] for row in rows)
    return [str(row["type"]) if row.get("type") is not None else question_group(row["question"], variable)
            for row in rows]


def is_short(answer: str) -> bool:
    return 0 < len(words(answer)) <= SHORT_ANSWER_WORDS


def breakdown(rows: Sequence[dict], normalize=lambda s: s) -> dict[str, Any]:
    """`{"by_group": {group: {n, correct, accuracy}}, "confusions": [{answer, prediction, count}],
    "grouped_by": "type" | "question"}` of evaluation rows (those of predictions.jsonl).
    Confusions count wrong predictions of short answers, normalised by `normalize`."""
    total: Counter = Counter()
    correct: Counter = Counter()
    for group, row in zip(group_rows(rows), rows):
        total[group] += 1
        correct[group] += bool(row["correct"])
    confusions = Counter(
        (normalize(row["answer"]), normalize(row["prediction"]))
        for row in rows if not row["correct"] and is_short(row["answer"])
    )
    by_group = {g: {"n": total[g], "correct": correct[g], "accuracy": correct[g] / total[g]}
                for g in sorted(total, key=lambda g: (-total[g], g))}
    return {
        "grouped_by": "type" if rows and all(r.get("type") is not None for r in rows) else "question",
        "by_group": by_group,
        "confusions": [{"answer": a, "prediction": p, "count": c}
                       for (a, p), c in confusions.most_common(TOP_CONFUSIONS)],
    }


def format_report(summary: dict) -> str:
    """The printed report of one evaluation summary (with its breakdown)."""
    lines = [f"accuracy {summary['accuracy']:.2%} ({summary['correct']}/{summary['n']}) on {summary.get('data')}"]
    detail = summary.get("breakdown") or {}
    if detail.get("by_group"):
        width = max(len(g) for g in detail["by_group"])
        lines.append(f"by {detail['grouped_by']}:")
        lines += [f"  {g:<{width}}  {v['accuracy']:7.2%}  ({v['correct']}/{v['n']})"
                  for g, v in detail["by_group"].items()]
    if detail.get("confusions"):
        lines.append("commonest confusions (answer -> prediction):")
        lines += [f"  {c['answer']!r} -> {c['prediction']!r}: {c['count']}" for c in detail["confusions"]]
    return "\n".join(lines)


def read_summary(path: str | Path, flag: str = "--compare") -> dict:
    """An evaluation's summary.json, from the file or the directory holding it."""
    p = Path(path)
    file = p / "summary.json" if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"{flag} {path}: no summary.json there; give an evaluation's output directory "
                        "(what `seechat eval` printed as its output) or its summary.json")
    return json.loads(file.read_text())


def format_comparison(a: dict, b: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """Two evaluation summaries side by side: overall, then per group (groups of either)."""
    ga = (a.get("breakdown") or {}).get("by_group", {})
    gb = (b.get("breakdown") or {}).get("by_group", {})
    groups = list(ga) + [g for g in gb if g not in ga]
    width = max([len(g) for g in groups] + [len("overall")])

    def cell(v: dict | None) -> str:
        return f"{v['accuracy']:7.2%} ({v['correct']}/{v['n']})" if v else "      -"

    head = f"{'':<{width}}  {names[0]:>18}  {names[1]:>18}  {'B - A':>7}"
    rows = [head, f"{'overall':<{width}}  {cell(a):>18}  {cell(b):>18}  {100 * (b['accuracy'] - a['accuracy']):+6.2f}"]
    for g in groups:
        delta = f"{100 * (gb[g]['accuracy'] - ga[g]['accuracy']):+6.2f}" if g in ga and g in gb else ""
        rows.append(f"{g:<{width}}  {cell(ga.get(g)):>18}  {cell(gb.get(g)):>18}  {delta:>7}")
    return "\n".join(rows)

