"""Text metrics: caption tokenisation and scores, VQA answer normalisation and accuracy, checked by hand."""

import math

import pytest

from vlm_train.eval.text_metrics import (
    caption_scores,
    exact_match,
    normalize_answer,
    tokenize_caption,
    vqa_accuracy,
)


def test_tokenize_caption_drops_punctuation():
    assert tokenize_caption("A dog, running!") == ["a", "dog", "running"]
    assert tokenize_caption("It's a T-shirt; costs 3.50.") == ["it's", "a", "t-shirt", "costs", "3.50"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two.", "2"),
        ("The Red Circle", "red circle"),
        ("dont", "don't"),
        ("don't", "don't"),
        ("  yes!! ", "yes"),
        ("3.5", "3.5"),
        ("3.5.", "3.5"),
        (".5", ".5"),
        ("a dog", "dog"),
        ("none", "0"),
        ("1,000", "1000"),
        ("red, blue", "red blue"),
        ("'isnt'", "isn't"),
        ("t-shirt", "t shirt"),
        ("An   apple\tpie", "apple pie"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match_after_normalisation():
    assert exact_match("Two", "2")
    assert exact_match("The dog.", "dog")
    assert not exact_match("red", "blue")


def test_vqa_accuracy_ten_references():
    def refs(matches: int) -> list[str]:
        return ["2"] * matches + ["3"] * (10 - matches)

    # 4 matches: every leave-one-out subset of 9 keeps at least 3 -> min(1, k/3) = 1 each -> 1.0.
    assert vqa_accuracy("two", refs(4)) == pytest.approx(1.0)
    # 3 matches: leaving out one of the 3 leaves k = 2 -> 2/3 (3 subsets); leaving out one of the 7 others
    # leaves k = 3 -> 1 (7 subsets). Mean = (3 * 2/3 + 7 * 1) / 10 = 9/10.
    assert vqa_accuracy("two", refs(3)) == pytest.approx(0.9)
    # 1 match: leaving it out gives k = 0 -> 0 (1 subset); leaving out any of the 9 others gives k = 1 -> 1/3
    # (9 subsets). Mean = (0 + 9 * 1/3) / 10 = 3/10.
    assert vqa_accuracy("Two.", refs(1)) == pytest.approx(0.3)
    assert vqa_accuracy("four", refs(3)) == 0.0


def test_vqa_accuracy_single_reference_is_exact_match():
    assert vqa_accuracy("The circle", ["circle"]) == 1.0
    assert vqa_accuracy("square", ["circle"]) == 0.0
    with pytest.raises(ValueError):
        vqa_accuracy("circle", [])


def test_caption_scores_identical_captions():
    refs = {"img1": ["a dog runs on the grass"], "img2": ["two cats sleep on a red sofa"]}
    preds = {key: texts[0] for key, texts in refs.items()}
    scores = caption_scores(preds, refs)
    assert set(scores) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr-D"}
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    # Identical tf-idf vectors have cosine 1 for n = 1..4 and no length penalty: 10 * mean(1, 1, 1, 1) = 10.
    # ("on" and "a" appear in both images' references, so their idf is 0, but that scales both vectors alike.)
    assert scores["CIDEr-D"] > 0
    assert scores["CIDEr-D"] == pytest.approx(10.0)


def test_caption_scores_disjoint_prediction():
    scores = caption_scores(
        {"img1": "purple elephants juggle", "img2": "green frogs sing"},
        {"img1": ["a dog runs on grass"], "img2": ["two cats sleep on sofas"]},
    )
    # No shared unigram: BLEU-1 is 1e-15 / (6 + 1e-9), pycocoevalcap's smoothing, not exactly 0.
    assert scores["BLEU-1"] < 1e-9
    assert scores["ROUGE-L"] == 0.0
    assert scores["CIDEr-D"] == 0.0


def test_caption_scores_hand_computed():
    scores = caption_scores({"x": "A red circle."}, {"x": ["a blue circle"]})
    # Unigrams "a", "circle" match out of 3; equal lengths so brevity penalty ~1 (exp(1 - (3 + 1e-9) / 3)).
    # The 1e-15 / 1e-9 smoothing moves the result by ~1e-10 from 2/3.
    assert scores["BLEU-1"] == pytest.approx(2 / 3, abs=1e-9)
    # No bigram matches: BLEU-2 = sqrt(2/3 * 1e-15 / 2) ~ 2e-8, smoothed but effectively 0.
    assert scores["BLEU-2"] < 1e-6
    # LCS "a circle" = 2: P = R = 2/3 and (1 + b^2) P R / (R + b^2 P) = 2/3 whatever b is.
    assert scores["ROUGE-L"] == pytest.approx(2 / 3)
    # One image: every idf is log(1) - log(1) = 0, so CIDEr-D is 0 however good the caption.
    assert scores["CIDEr-D"] == 0.0

    short = caption_scores({"x": "a dog"}, {"x": ["a dog runs fast"]})
    # Precision 1, but 2 words against 4: brevity penalty exp(1 - 4/2) = e^-1.
    assert short["BLEU-1"] == pytest.approx(math.exp(-1), abs=1e-6)
    # LCS 2: P = 1, R = 1/2, b = 1.2 -> 2.44 * 0.5 / (0.5 + 1.44) = 1.22 / 1.94.
    assert short["ROUGE-L"] == pytest.approx(1.22 / 1.94)


def test_caption_scores_two_images_with_distinct_words_score_ten():
    refs = {"a": ["red ball on grass"], "b": ["blue car in street"]}
    # Every n-gram occurs in one image of two: idf = log 2 for all, vectors equal, cosine 1 for n = 1..4 -> 10.
    assert caption_scores({k: v[0] for k, v in refs.items()}, refs)["CIDEr-D"] == pytest.approx(10.0)


def test_caption_scores_mismatched_ids():
    with pytest.raises(ValueError, match="'img2'"):
        caption_scores({"img1": "a dog", "img2": "a cat"}, {"img1": ["a dog"]})
    with pytest.raises(ValueError, match="'img3'"):
        caption_scores({"img1": "a dog"}, {"img1": ["a dog"], "img3": ["a cat"]})
    with pytest.raises(ValueError, match="'img1'"):
        caption_scores({"img1": "a dog"}, {"img1": []})
