"""Dialogue metrics: PTB tokenisation as pycocoevalcap's Java pipeline does it, ROUGE-L and CIDEr-D values, joins."""

from __future__ import annotations

import math
from collections import Counter

import pyarrow as pa
import pytest

from llavaseg.dialogue import dialogue_scores, dialogue_scores_from_tables, ptb_tokenize

# Expected strings are Stanford PTBTokenizer 3.4.1 output (the jar pycocoevalcap ships, run with -preserveLines
# -lowerCase) after pycocoevalcap's punctuation removal.
PTB_CASES = [
    (
        "In the image, the snail is protected by the rocks and the leaf it is sitting on.",
        "in the image the snail is protected by the rocks and the leaf it is sitting on",
    ),
    (
        "The man's hat (a red one) doesn't fit; it's \"too small\" -- really!",
        "the man 's hat -lrb- a red one -rrb- does n't fit it 's too small really",
    ),
    (
        "You can't sit on the cactus... it would hurt! I'm sure they'll go; we've seen you'd cannot.",
        "you ca n't sit on the cactus it would hurt i 'm sure they 'll go we 've seen you 'd can not",
    ),
    (
        "Use the 3.5-inch knife, e.g. the well-known one, at 10:30 a.m. for 1,000 people -- and/or A&B.",
        "use the 3.5-inch knife e.g. the well-known one at 10:30 a.m. for 1,000 people and/or a&b",
    ),
    (
        "Items [1] and {2} cost $5 and 50% less, etc. Mr. Brown's house is in the U.S.",
        "items -lsb- 1 -rsb- and -lcb- 2 -rcb- cost $ 5 and 50 % less etc. mr. brown 's house is in the u.s.",
    ),
    (
        "It\u2019s the cat\u2019s bowl \u2013 the one with \u201cKitty\u201d written on it\u2026",
        "it 's the cat 's bowl the one with kitty written on it",
    ),
    (
        "The owners' **big** dog, <seg> token, x=y+z, -5 and +7 degrees.",
        "the owners ** big ** dog <seg> token x = y + z -5 and +7 degrees",
    ),
]


@pytest.mark.parametrize(("text", "expected"), PTB_CASES)
def test_ptb_tokenize_matches_stanford_ptbtokenizer(text: str, expected: str) -> None:
    assert ptb_tokenize(text) == expected


def cider_d_reference(candidates: dict[str, str], references: dict[str, list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D from its definition (Vedantam et al. 2015, as released in coco-caption), on pre-tokenised text.

    g_k(s) = tf_k(s) * log(N / max(1, df_k)) with df_k the number of samples whose references contain n-gram k;
    CIDEr-D_n(c, S) = 10 / |S| * sum_s exp(-(l_c - l_s)^2 / (2 sigma^2))
                      * sum_k min(g_k(c), g_k(s)) g_k(s) / (|g(c)| |g(s)|);
    CIDEr-D = mean over n = 1..4, then mean over samples. Lengths are counted in bigrams, as the released code does.
    """

    def ngrams(text: str, n: int) -> Counter:
        words = text.split()
        return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

    ids = sorted(candidates)
    document_frequency = Counter()
    for sid in ids:
        document_frequency.update({gram for ref in references[sid] for n in range(1, 5) for gram in ngrams(ref, n)})

    def weights(text: str, n: int) -> dict:
        return {g: tf * math.log(len(ids) / max(1.0, document_frequency[g])) for g, tf in ngrams(text, n).items()}

    def norm(vector: dict) -> float:
        return math.sqrt(sum(v * v for v in vector.values()))

    total = 0.0
    for sid in ids:
        cand = candidates[sid]
        per_sample = 0.0
        for ref in references[sid]:
            delta = sum(ngrams(cand, 2).values()) - sum(ngrams(ref, 2).values())
            penalty = math.exp(-(delta**2) / (2 * sigma**2))
            for n in range(1, 5):
                g_c, g_r = weights(cand, n), weights(ref, n)
                dot = sum(min(v, g_r.get(g, 0.0)) * g_r.get(g, 0.0) for g, v in g_c.items())
                denominator = norm(g_c) * norm(g_r)
                per_sample += penalty * (dot / denominator if denominator else 0.0) / 4
        total += 10.0 * per_sample / len(references[sid])
    return total / len(ids)


REFERENCES = {
    "a": "a red apple lies on the wooden table",
    "b": "a blue car is parked in the street",
    "c": "the green tree stands near the old house",
    "d": "two dogs play with a ball on the grass",
}


def test_identical_answers_score_rouge_one_and_cider_ten() -> None:
    scores = dialogue_scores(REFERENCES, REFERENCES)
    assert scores["count"] == 4
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    # Every clipped cosine is 1 and there is no length penalty: 10 x mean over n of 1.
    assert scores["CIDEr"] == pytest.approx(10.0)


def test_disjoint_answers_score_zero() -> None:
    candidates = {"a": "zebra", "b": "quantum flux capacitor", "c": "seven", "d": "purple mountains"}
    scores = dialogue_scores(candidates, REFERENCES)
    assert scores == {"ROUGE-L": 0.0, "CIDEr": 0.0, "count": 4}


def test_rouge_l_is_lcs_f_measure_best_reference() -> None:
    # LCS "the cat on the mat" = 5 of 6 words on both sides -> P = R = F = 5/6; punctuation and case are ignored.
    scores = dialogue_scores({"x": "The cat sat on the mat."}, {"x": "the cat is on the mat"})
    assert scores["ROUGE-L"] == pytest.approx(5 / 6)
    # Two references: the better one counts (LCS "a dog runs" = 3 of 4 and 3 words -> F = 2*(3/4)(1)/(3/4+1) = 6/7).
    scores = dialogue_scores({"x": "a dog runs fast"}, {"x": ["nothing alike here", "a dog runs"]})
    assert scores["ROUGE-L"] == pytest.approx(6 / 7)


def test_cider_matches_cider_d_definition() -> None:
    candidates = {
        "a": "A red apple is on the table.",
        "b": "A blue bus is parked in the street!",
        "c": "A tree near the house, (maybe) old.",
        "d": "Two dogs play with a ball on the grass",
    }
    references = {**REFERENCES, "b": [REFERENCES["b"], "there's a blue car on the road"]}
    expected = cider_d_reference(
        {k: ptb_tokenize(v) for k, v in candidates.items()},
        {k: [ptb_tokenize(r) for r in ([v] if isinstance(v, str) else v)] for k, v in references.items()},
    )
    scores = dialogue_scores(candidates, references)
    assert 0.5 < expected < 10.0
    assert scores["CIDEr"] == pytest.approx(expected, rel=1e-9)


def test_cider_is_zero_for_a_single_sample() -> None:
    # One sample: every n-gram's document frequency equals the corpus size, so every IDF weight is log(1) = 0.
    scores = dialogue_scores({"a": REFERENCES["a"]}, {"a": REFERENCES["a"]})
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    assert scores["CIDEr"] == 0.0


def test_only_ids_with_both_answer_and_reference_count() -> None:
    candidates = {"a": REFERENCES["a"], "b": REFERENCES["b"], "z": "no reference for this one"}
    references = {"a": REFERENCES["a"], "b": REFERENCES["b"], "c": REFERENCES["c"], "d": "   ", "e": None}
    assert dialogue_scores(candidates, references)["count"] == 2
    empty = dialogue_scores({"z": "answer"}, {"d": "   "})
    assert empty["count"] == 0 and math.isnan(empty["ROUGE-L"]) and math.isnan(empty["CIDEr"])


def test_scores_from_tables_join_on_sample_id() -> None:
    shard = pa.table({
        "sample_id": ["s/0", "s/1", "s/2", "s/3", "s/4"],
        "reason_answer": [REFERENCES["a"], REFERENCES["b"], "unrelated words only", None, REFERENCES["d"]],
        "status": ["ok", "ok", "ok", "error", "ok"],
        "target": ["apple", "car", "x", None, "dogs"],
    })  # fmt: skip
    manifest = pa.table({
        "sample_id": ["s/4", "s/3", "s/2", "s/1", "s/0", "s/9"],
        "reference_answer": pa.array([REFERENCES["d"], REFERENCES["c"], None, REFERENCES["b"], REFERENCES["a"],
                                      REFERENCES["c"]], pa.string()),
    })  # fmt: skip
    scores = dialogue_scores_from_tables(shard, manifest)
    # s/2 has no reference, s/3 is an error row, s/9 has no answer: three identical pairs remain.
    assert scores["count"] == 3
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    assert scores["CIDEr"] == pytest.approx(10.0)


def test_scores_from_tables_report_bad_input() -> None:
    shard = pa.table({"sample_id": ["s/0", "s/0"], "reason_answer": ["x", "y"], "status": ["ok", "ok"]})
    manifest = pa.table({"sample_id": ["s/0"], "reference_answer": ["x"]})
    with pytest.raises(ValueError, match=r"shard table row 1: sample_id 's/0' appears twice"):
        dialogue_scores_from_tables(shard, manifest)
    with pytest.raises(KeyError, match=r"manifest table has no column 'reference_answer'"):
        dialogue_scores_from_tables(shard.slice(0, 1), manifest.drop_columns(["reference_answer"]))
