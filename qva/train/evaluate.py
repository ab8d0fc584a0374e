"""Scoring a model's greedy answers: exact match, word error rate, character error rate.

Exact match compares the whole answer after stripping surrounding whitespace and final punctuation (and
collapsing inner whitespace). WER and CER are computed as speech people score them: both texts first go through
the English normalisation of `normalize.py` (case, punctuation, numbers in words → digits, contractions), then
WER is the word-level edit distance over the reference's word count and CER the character-level one (spaces
between words count) over the reference's characters, each summed over the set (Levenshtein: substitutions,
insertions and deletions). `wer_plain` is the WER without that normalisation (only whitespace and final
punctuation), as before.
"""

from __future__ import annotations

import re

import torch

from ..generate import DEFAULT_EOS, generate
from .data import Sample, collate, to_device
from .normalize import english

FINAL_PUNCTUATION = ".,!?;:。！？"


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip()).rstrip(FINAL_PUNCTUATION).strip()


def word_errors(hyp: str, ref: str) -> tuple[int, int]:
    """(edit distance in words, number of reference words), after `normalize` (whitespace, final punctuation)."""
    return edit_distance(normalize(hyp).split(), normalize(ref).split())


def edit_distance(h: list, r: list) -> tuple[int, int]:
    """(Levenshtein distance from `h` to `r`, len(r))."""
    prev = list(range(len(h) + 1))
    for i, rw in enumerate(r, start=1):
        cur = [i] + [0] * len(h)
        for j, hw in enumerate(h, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
        prev = cur
    return prev[-1], len(r)


def score(hyps: list[str], refs: list[str]) -> dict:
    """{"exact_match": %, "wer": % (English-normalised), "cer": % (likewise), "wer_plain": %, "n": count}."""
    if not refs:
        return {"exact_match": 0.0, "wer": 0.0, "cer": 0.0, "wer_plain": 0.0, "n": 0}
    exact = sum(normalize(h) == normalize(r) for h, r in zip(hyps, refs))

    def rate(errors):
        return 100.0 * sum(e for e, _ in errors) / max(1, sum(n for _, n in errors))

    normed = [(english(h), english(r)) for h, r in zip(hyps, refs)]
    return {"exact_match": 100.0 * exact / len(refs), "wer": rate([edit_distance(h.split(), r.split()) for h, r in normed]),
            "cer": rate([edit_distance(list(h), list(r)) for h, r in normed]),
            "wer_plain": rate([word_errors(h, r) for h, r in zip(hyps, refs)]), "n": len(refs)}


@torch.no_grad()
def greedy_answers(model, processor, samples: list[Sample], batch_size: int = 32, max_new_tokens: int = 32) -> list[str]:
    """Each sample's greedy answer to its generation prompt (everything before its last answer)."""
    was_training = model.training
    model.eval()
    answers = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        batch = collate(chunk, processor.pad_token_id, prompt_only=True)
        out = generate(model, **batch, max_new_tokens=max_new_tokens, eos_token_id=list(DEFAULT_EOS),
                       pad_token_id=processor.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        for row in new.tolist():
            ids = []
            for t in row:
                if t in DEFAULT_EOS:
                    break
                ids.append(t)
            answers.append(processor.decode(ids))
    model.train(was_training)
    return answers


def evaluate(model, processor, samples: list[Sample], batch_size: int = 32, max_new_tokens: int = 32) -> dict:
    """Greedy answers scored against each sample's reference answer: {"exact_match", "wer", "n", "answers"}."""
    answers = greedy_answers(model, processor, samples, batch_size, max_new_tokens)
    return {**score(answers, [s.example.answer for s in samples]), "answers": answers}


@torch.no_grad()
def run_eval(model, processor, dev: list[Sample], batch_size: int, max_new_tokens: int, limit: int | None = None,
             device=torch.device("cpu")) -> dict:
    """Dev loss (over all dev samples, per labelled token) and greedy exact match / WER (first `eval_limit`)."""
    was_training = model.training
    model.eval()
    loss_sum, n = 0.0, 0
    for i in range(0, len(dev), batch_size):
        out = model(**to_device(collate(dev[i:i + batch_size], processor.pad_token_id), device))
        loss_sum, n = loss_sum + float(out.loss_sum), n + out.n_labels
    scored = dev[: limit] if limit else dev
    result = evaluate(model, processor, scored, batch_size, max_new_tokens)
    model.train(was_training)
    return {"eval_loss": loss_sum / max(n, 1), **{k: result[k] for k in ("exact_match", "wer", "cer", "wer_plain", "n")}}
