"""Knowledge the user did not list, protected with nothing asked of them: a packaged set of general-knowledge
questions (`resources/general_knowledge.txt`, 100 questions written for lunar-lens, none asking a fact that
the evaluation's factual sets ask) with the model's own greedy answers, kept like a `--keep` set: an edit that
fires on general-knowledge prompts shows up there before it shows up in a user's factual evaluation.

Only answers the model gives with confidence are kept (geometric-mean token probability ≥ `min_confidence`):
those are knowledge. A guess is not, and it flips under any change of W_out: on a PISTOL model that knows none
of these questions (experiments/zoo.py's dev model llama-pistol1-ab, with every answer kept, commit "WIP: knowledge
nobody listed"), every redirecting candidate kept 0.16–0.33 of its guessed answers and nothing was exported, while
the edit exported with confident answers only keeps its factual ROUGE-1 at 0.97.
Questions too close to a forget question (ROUGE-1 F1 ≥ `max_similarity`) or already listed are dropped, so
the keep rows never ask for what must go. (Questions the model samples itself were tried first: models
fine-tuned with the loss on answers only, like the zoo's and the toy world's, do not write questions.)"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

import torch
from transformer_lens.model_bridge import TransformerBridge

from lunar_lens.data.qa import QA
from lunar_lens.edit.refine import answer_rows, answer_statistics
from lunar_lens.metrics.text import rouge1
from lunar_lens.model.generation import own_answers


def general_questions() -> list[str]:
    """The packaged general-knowledge questions."""
    text = resources.files("lunar_lens").joinpath("resources", "general_knowledge.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def unlisted_questions(n: int, forget: Sequence[str], listed: Sequence[str] = (), max_similarity: float = 0.8) -> list[str]:
    """The first `n` packaged questions that are neither listed already nor at ROUGE-1 F1 ≥
    `max_similarity` to a `forget` question."""
    listed_set = set(listed)
    chosen = []
    for question in general_questions():
        if len(chosen) == n:
            break
        if question in listed_set or (forget and max(rouge1([question] * len(forget), list(forget))) >= max_similarity):
            continue
        chosen.append(question)
    return chosen


def unlisted_keep(
    bridge: TransformerBridge, n: int, forget: Sequence[str], listed: Sequence[str] = (), min_confidence: float = 0.9, max_new_tokens: int = 32
) -> list[QA]:
    """`unlisted_questions` with the model's own greedy answers, those it gives with a geometric-mean token
    probability ≥ `min_confidence` (teacher-forced on its first answer tokens): keep rows for knowledge nobody listed."""
    items = own_answers(bridge, [QA(question) for question in unlisted_questions(n, forget, listed)], max_new_tokens)
    if not items:
        return []
    with torch.no_grad():
        sums, counts, _ = answer_statistics(bridge, answer_rows(bridge, ([qa.question for qa in items], [qa.answer for qa in items]), max_new_tokens), [])
    confidence = (-sums / counts.clamp_min(1)).exp()
    return [qa for qa, sure in zip(items, confidence.tolist()) if sure >= min_confidence]
