"""Dialogue quality of the MLLM's step-1 answers: ROUGE-L and CIDEr against reference answers (paper Table 1, right).

The paper reports ROUGE-L 0.393 / CIDEr 0.796 for LLaVASeg-13B and 0.290 / 0.107 for LISA-13B-explain on ReasonSeg val,
without naming an implementation; LISA's public code has no dialogue evaluation. We use the standard packages:

- **ROUGE-L**: ``rouge_score`` (Google's reimplementation of the ROUGE-1.5.5 scores), ``rougeL`` F-measure (beta 1), no
  stemming, its own tokenizer (lowercase, every character outside ``[a-z0-9]`` is a separator). With several references
  per sample the best-scoring reference counts (``RougeScorer.score_multi``). The reported number is the mean over
  samples. Note: coco-caption's ``pycocoevalcap.rouge`` weighs recall with beta 1.2 and can differ in the second
  decimal.
- **CIDEr**: ``pycocoevalcap.cider.Cider``, which is CIDEr-D (n-grams 1..4, clipped counts, Gaussian length penalty
  with sigma 6, x10), corpus-level: the IDF weights come from the references of all scored samples. With a single
  sample every n-gram has document frequency 1 = the corpus size, its IDF is 0 and CIDEr is 0; with few samples it is
  unstable. It is meaningful over a whole split (ReasonSeg val has 200 samples).

CIDEr's reference pipeline tokenises with Stanford CoreNLP's PTBTokenizer (Java, ``-lowerCase``) and then drops the
tokens in ``pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS``. :func:`ptb_tokenize` reproduces that in Python:
lowercase; contractions split as PTB does (``doesn't`` -> ``does n't``, ``it's`` -> ``it 's``, ``can't`` -> ``ca n't``,
``cannot`` -> ``can not``); hyphenated words, decimals, times, ``and/or``, ``a&b``, e-mail addresses, URLs, acronyms
(``u.s.``, ``e.g.``) and common abbreviations (``etc.``, ``mr.``) kept whole; every other punctuation mark its own
token; brackets become ``-lrb-``/``-rrb-``/``-lsb-``/``-rsb-``/``-lcb-``/``-rcb-``; curly quotes, unicode dashes and
the ellipsis normalised. As in the reference pipeline, the removal list is matched case-sensitively against lowercased
tokens, so the bracket tokens (listed there in upper case) survive, while quotes, ``. , ; : ? ! - -- ...`` are dropped.
Checked token for token against PTBTokenizer 3.4.1 (the jar shipped with pycocoevalcap): identical on answer-like text;
over the paper's own text (7,348 tokens, Markdown and references included) 50 tokens differ, all in rare forms
(``'90s``, ``y'all``, ``rock'n'roll``, ``arXiv:2306.15195``, ``\\*``, ``sec.3.2``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence

import pyarrow as pa
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS
from rouge_score import rouge_scorer

log = logging.getLogger(__name__)

_REMOVED_TOKENS = frozenset(PUNCTUATIONS)

# Stanford PTBTokenizer's normalisations that matter once punctuation is removed.
_UNICODE_NORMALISATION = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u2032": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"',
    "\u2013": " -- ", "\u2014": " -- ", "\u2015": " -- ", "\u2012": " -- ",
    "\u2026": " ... ", "\u00a0": " ", "\u20ac": "$", "\u00a3": "#",
})  # fmt: skip
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-", '"': "''"}

# Multi-word forms PTB splits inside a word (Treebank's CONTRACTIONS2/3).
_SPLIT_FORMS = [
    (re.compile(r"\b(can)(not)\b"), r"\1 \2"),
    (re.compile(r"\b(gon|wan)(na)\b"), r"\1 \2"),
    (re.compile(r"\b(got)(ta)\b"), r"\1 \2"),
    (re.compile(r"\b(lem|gim)(me)\b"), r"\1 \2"),
    (re.compile(r"(?<![\w'])('t)(is|was)\b"), r"\1 \2"),
    (re.compile(r"(\w)(n't)\b"), r"\1 \2"),
    (re.compile(r"(\w)('(?:s|re|ve|ll|m|d))\b"), r"\1 \2"),
]

_ABBREVIATIONS = (
    "mr|mrs|ms|dr|prof|st|jr|sr|vs|etc|al|co|fig|figs|jan|feb|aug|sep|sept|oct|nov|dec|inc|ltd|corp|dept|est"
)
_TOKEN_RE = re.compile(
    rf"""
    (?:https?|ftp)://[^\s<>"]*[^\s<>".,;:!?')\]}}]              # URL
  | [\w.+-]+@\w[\w-]*(?:\.\w[\w-]*)+                          # e-mail address
  | (?<!\w)(?:[^\W\d_]\.){{2,}}                                 # acronym: u.s., e.g., a.m.
  | (?<!\w)(?:{_ABBREVIATIONS})\.(?=[\s,;:)\]*]|$) | (?<!\w)no\.(?=\s*\d)   # abbreviation
  | </?[^\W\d_][\w-]*>                                        # SGML-like tag: <b>, </b>, <seg>
  | n't | '(?:s|re|ve|ll|m|d)\b | 't(?=\s)                     # split contraction parts
  | (?:(?<!\w)[+-](?=\d))?                                     # signed number...
    \w+(?:(?:[-&/.'](?=\w)|(?<=\d)[,:](?=\d))\w+)*           # ...or word: well-known, 3.5-inch, 10:30, 1,000, o'clock
  | \.\.\. | --+ | \*+ | \#+ | =+                                # ellipsis, dash, runs of one mark
  | \S                                                       # any other mark, one character each
    """,
    re.VERBOSE,
)


def ptb_tokenize(text: str) -> str:
    """``text`` as pycocoevalcap's PTBTokenizer plus punctuation removal gives it: lowercase tokens joined by spaces."""
    text = text.translate(_UNICODE_NORMALISATION).lower().replace("\n", " ")
    for pattern, replacement in _SPLIT_FORMS:
        text = pattern.sub(replacement, text)
    tokens = (_BRACKETS.get(token, token) for token in _TOKEN_RE.findall(text))
    return " ".join(token for token in tokens if token not in _REMOVED_TOKENS)


def _as_reference_list(reference: str | Sequence[str] | None) -> list[str]:
    if reference is None:
        return []
    if isinstance(reference, str):
        reference = [reference]
    return [r for r in reference if isinstance(r, str) and r.strip()]


def dialogue_scores(candidates: Mapping[str, str], references: Mapping[str, str | list[str]]) -> dict:
    """ROUGE-L and CIDEr of candidate answers against reference answers, over the ids present in both.

    Args:
        candidates: sample id -> the MLLM's answer (None counts as an empty answer).
        references: sample id -> one reference answer or a list of them; ids whose references are all empty or None
            are left out.

    Returns:
        ``{"ROUGE-L": mean rougeL F-measure, "CIDEr": corpus CIDEr-D, "count": n}``; with no scorable sample, count 0
        and NaN scores. See the module docstring for tokenisation and the CIDEr corpus caveat.
    """
    ids = sorted(sid for sid in candidates.keys() & references.keys() if _as_reference_list(references[sid]))
    if not ids:
        return {"ROUGE-L": math.nan, "CIDEr": math.nan, "count": 0}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge_total = 0.0
    cider_candidates, cider_references = {}, {}
    for sid in ids:
        answer = candidates[sid] or ""
        refs = _as_reference_list(references[sid])
        rouge_total += scorer.score_multi(refs, answer)["rougeL"].fmeasure
        cider_candidates[sid] = [ptb_tokenize(answer)]
        cider_references[sid] = [ptb_tokenize(r) for r in refs]
    cider, _ = Cider().compute_score(cider_references, cider_candidates)
    if len(ids) < 10:
        log.warning("CIDEr over %d samples: its IDF weights need a corpus; the value is not comparable", len(ids))
    return {"ROUGE-L": rouge_total / len(ids), "CIDEr": float(cider), "count": len(ids)}


def _column(table: pa.Table, name: str, what: str) -> list:
    if name not in table.column_names:
        raise KeyError(f"{what} has no column {name!r} (columns: {', '.join(table.column_names)})")
    return table.column(name).to_pylist()


def _unique_map(keys: list, values: list, what: str) -> dict:
    mapping: dict = {}
    for row, (key, value) in enumerate(zip(keys, values, strict=True)):
        if key in mapping:
            raise ValueError(f"{what} row {row}: sample_id {key!r} appears twice")
        mapping[key] = value
    return mapping


def dialogue_scores_from_tables(shard_table: pa.Table, manifest_table: pa.Table) -> dict:
    """:func:`dialogue_scores` of stage-1 shard rows against manifest rows, joined on ``sample_id``.

    Candidates are the shards' ``reason_answer`` of rows with ``status == "ok"``; references are the manifest's nullable
    ``reference_answer``. Raises KeyError naming a missing column, ValueError naming a duplicated sample id.
    """
    shard_ids = _column(shard_table, "sample_id", "shard table")
    statuses = _column(shard_table, "status", "shard table")
    answers = _column(shard_table, "reason_answer", "shard table")
    ok = [i for i, status in enumerate(statuses) if status == "ok"]
    candidates = _unique_map([shard_ids[i] for i in ok], [answers[i] for i in ok], "shard table")
    references = _unique_map(
        _column(manifest_table, "sample_id", "manifest table"),
        _column(manifest_table, "reference_answer", "manifest table"),
        "manifest table",
    )
    return dialogue_scores(candidates, references)
