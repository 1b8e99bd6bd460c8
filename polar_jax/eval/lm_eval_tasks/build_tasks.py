"""Builds the JSONL data of the local lm-eval tasks from WikiText-2 test (shared/data/wikitext-2/test.txt).

    python polar_jax/eval/lm_eval_tasks/build_tasks.py [--shared ../shared]

Deterministic (fixed seed): rerunning it rewrites the committed files byte for byte.

- next_sentence.jsonl: "which sentence comes next". Context = two consecutive sentences of a paragraph;
  the choices are the sentence that follows and three sentences from other articles of similar length
  (within 0.75x-1.33x its words, so length alone does not give the answer away).
- wikitext_paragraphs.jsonl: paragraphs of at least 40 words, spread evenly over the test set, for the
  rolling log-likelihood (perplexity) task.

The text keeps WikiText's tokenized form (" @-@ ", " , ", "<unk>"), which is how the embedded model saw it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
SEED = 16
N_QUESTIONS = 200
N_PARAGRAPHS = 60
SENTENCE_WORDS = (8, 40)

_TITLE = re.compile(r"^ = [^=].* = $")


def articles(text: str) -> list[list[str]]:
    """Paragraphs grouped by article (a line ' = Title = ' starts one; ' = = Section = = ' lines are dropped)."""
    out: list[list[str]] = []
    for line in text.split("\n"):
        if _TITLE.match(line):
            out.append([])
        elif line.strip() and not line.lstrip().startswith("=") and out:
            out[-1].append(line.strip())
    return [a for a in out if a]


def sentences(paragraph: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<= \.) ", paragraph) if s.strip()]


def _fits(sentence: str) -> bool:
    return SENTENCE_WORDS[0] <= len(sentence.split()) <= SENTENCE_WORDS[1] and sentence.endswith(" .")


def next_sentence_questions(arts: list[list[str]], rng: random.Random) -> list[dict]:
    pool = [(a, s) for a, paras in enumerate(arts) for p in paras for s in sentences(p) if _fits(s)]
    candidates = []
    for a, paras in enumerate(arts):
        for p in paras:
            sents = sentences(p)
            for i in range(2, len(sents)):
                if all(_fits(s) for s in sents[i - 2 : i + 1]):
                    candidates.append((a, sents[i - 2] + " " + sents[i - 1], sents[i]))
                    break  # one question per paragraph
    rng.shuffle(candidates)
    questions = []
    for a, context, answer in candidates[:N_QUESTIONS]:
        n = len(answer.split())
        similar = [s for b, s in pool if b != a and 0.75 * n <= len(s.split()) <= 1.33 * n and s != answer]
        choices = rng.sample(similar, 3)
        label = rng.randrange(4)
        choices.insert(label, answer)
        questions.append({"context": context, "choices": choices, "label": label})
    return questions


def rolling_paragraphs(arts: list[list[str]]) -> list[dict]:
    paras = [p for paras in arts for p in paras if len(p.split()) >= 40]
    stride = max(1, len(paras) // N_PARAGRAPHS)
    return [{"text": p} for p in paras[::stride][:N_PARAGRAPHS]]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("POLAR_SHARED", str(REPO.parent / "shared")))
    args = ap.parse_args()
    src = Path(args.shared) / "data" / "wikitext-2" / "test.txt"
    if not src.is_file():
        raise SystemExit(f"error: {src} not found (give --shared)")
    arts = articles(src.read_text(encoding="utf-8"))
    questions = next_sentence_questions(arts, random.Random(SEED))
    paragraphs = rolling_paragraphs(arts)
    write_jsonl(HERE / "next_sentence.jsonl", questions)
    write_jsonl(HERE / "wikitext_paragraphs.jsonl", paragraphs)
    print(f"{len(arts)} articles: {len(questions)} questions, {len(paragraphs)} paragraphs written to {HERE}")


if __name__ == "__main__":
    main()
