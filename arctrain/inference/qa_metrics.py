"""QA and generation metrics as the paper reports them (the reference's embed_llm/generation/metrics.py).

- exact match and F1 after SQuAD v1.1 normalisation, best over the gold answers;
- approximate match: the normalised answer's words appear, in order and contiguous, in the normalised output;
- answer in output (the xRAG metric): the answer's tokens (Unicode letters/digits runs and single other
  characters, lower-cased, NFD) appear contiguously in the output's; the same test on the passages gives the share
  of contexts that contain an answer;
- ROUGE-L F-measure (rouge-score, with stemming) and corpus BLEU (sacrebleu, 13a tokenisation, lower-cased) for
  records that ask for them (`"metric": "rougeL"` / `"bleu"`).

Where arctrain differs: F1 of two empty normalised strings is 1 (SQuAD's official script), and the reference's
rule that a yes/no/noanswer mismatch scores F1 0 is not applied (its token F1 gives 0 there anyway).
"""

import re
import string
import unicodedata
from collections import Counter
from functools import cache

import regex

_PUNCTUATION = set(string.punctuation)
_TOKEN = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])", flags=regex.IGNORECASE | regex.UNICODE)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(max(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: list[str]) -> float:
    return max(_f1(normalize_answer(prediction).split(), normalize_answer(a).split()) for a in answers)


def _f1(pred: list[str], gold: list[str]) -> float:
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return float(pred == gold)  # both empty: 1; one empty: 0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def approx_match(prediction: str, answers: list[str]) -> float:
    """1 when some answer's normalised words occur contiguously in the normalised prediction."""
    pred = normalize_answer(prediction).split(" ")
    return float(any(_contains(pred, normalize_answer(a).split(" ")) for a in answers))


def answer_in(text: str, answers: list[str]) -> float:
    """1 when some answer's tokens occur contiguously in `text`'s (the reference's `has_answer`)."""
    tokens = _tokens(text)
    return float(any(_contains(tokens, _tokens(a)) for a in answers))


def _tokens(text: str) -> list[str]:
    return [m.group().lower() for m in _TOKEN.finditer(unicodedata.normalize("NFD", text))]


def _contains(seq: list[str], part: list[str]) -> bool:
    return any(seq[i : i + len(part)] == part for i in range(len(seq) - len(part) + 1))


@cache
def _rouge():
    # only the summary metrics need it
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, answers: list[str]) -> float:
    """ROUGE-L F-measure, best over the references."""
    return max(_rouge().score(prediction, a)["rougeL"].fmeasure for a in answers)


def bleu(predictions: list[str], answers: list[list[str]]) -> float:
    """Corpus BLEU of the predictions against each record's first reference (the reference's setting)."""
    # only the translation metric needs it
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="13a", lowercase=True).corpus_score(predictions, [[a[0] for a in answers]]).score
