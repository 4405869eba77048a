"""Text metrics: caption scores (BLEU, ROUGE-L, CIDEr-D) and VQAv2-style answer accuracy.

Caption scores come from pycocoevalcap's pure-Python scorers, fed with our own tokenisation, because its
PTBTokenizer shells out to Java. Answer normalisation follows the rules the VQAv2 evaluation describes, written
here from that description.
"""

from __future__ import annotations

import re

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

__all__ = ["caption_scores", "exact_match", "normalize_answer", "tokenize_caption", "vqa_accuracy"]

# --- captions ---------------------------------------------------------------------------------------------------

# A token is a number with inner separators ("3.5", "1,000") or a run of letters/digits that may be joined by an
# inner apostrophe or hyphen ("don't", "t-shirt"); everything else is punctuation and falls away.
_CAPTION_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+(?:['-][^\W_]+)*")


def tokenize_caption(text: str) -> list[str]:
    """Lowercase ``text`` and split it into word tokens, dropping punctuation.

    ``"A dog, running!"`` gives ``["a", "dog", "running"]``. Inner apostrophes, hyphens and number separators stay
    inside their token, much as the PTB tokeniser COCO uses keeps hyphenated words whole.
    """
    return _CAPTION_TOKEN.findall(text.lower().replace("\u2019", "'"))


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Corpus-level caption metrics over the ids in ``predictions`` (one caption each) and ``references`` (a list each).

    Returns ``"BLEU-1"`` .. ``"BLEU-4"``, ``"ROUGE-L"`` and ``"CIDEr-D"``, all from pycocoevalcap on captions
    re-joined from :func:`tokenize_caption` tokens:

    - BLEU-n (``Bleu(4)``): corpus BLEU with clipped n-gram counts summed over all images, the geometric mean of the
      1..n precisions, and one brevity penalty comparing the total prediction length with the summed lengths of the
      reference closest in length to each prediction. The scorer
      adds 1e-15 to matches and 1e-9 to counts to avoid dividing by zero, so a perfect score is 1 - O(1e-10) and a
      score of nothing is O(1e-16) rather than exactly 1 or 0.
    - ROUGE-L (``Rouge()``): per image, the LCS-based F-measure with beta = 1.2, from the best precision and best
      recall over the references; then the mean over images.
    - CIDEr-D (``Cider()``, n = 4, sigma = 6): per image and n, the tf-idf vectors of the prediction and each
      reference, compared as a cosine whose numerator clips the prediction's weight at the reference's
      (``min(hyp, ref) * ref``) and which is multiplied by the Gaussian length penalty
      ``exp(-(len_hyp - len_ref)^2 / (2 * 6^2))``; the 1..4 values are averaged, then averaged over references and
      multiplied by 10; the result is the mean over images. There is no stemming. Two details of this
      implementation matter: the idf is ``log(#images) - log(max(1, #images whose references hold the n-gram))``
      over *this call's* references only, so scores depend on which images are scored together and a single image
      always scores 0 (every idf is log 1 = 0), and n-grams found in every image's references weigh nothing; and the
      lengths in the penalty are bigram counts (words - 1, or 0 when empty), so they differ from word counts only
      when one of the two captions is empty.

    Raises ``ValueError`` if the two dicts do not hold the same ids (naming the first id missing from either,
    predictions' order first), if there are no ids, or if an id has no references.
    """
    for key in predictions:
        if key not in references:
            raise ValueError(f"id {key!r} has a prediction but no references")
    for key in references:
        if key not in predictions:
            raise ValueError(f"id {key!r} has references but no prediction")
    if not predictions:
        raise ValueError("no captions to score")
    for key, refs in references.items():
        if not refs:
            raise ValueError(f"id {key!r} has an empty reference list")

    res = {key: [" ".join(tokenize_caption(text))] for key, text in predictions.items()}
    gts = {key: [" ".join(tokenize_caption(text)) for text in references[key]] for key in predictions}

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)  # verbose=0: it prints its counts by default
    rouge, _ = Rouge().compute_score(gts, res)
    if any(ref for refs in gts.values() for ref in refs):
        cider, _ = Cider().compute_score(gts, res)
    else:
        # Cider asserts on max() of an empty document-frequency table when no reference holds a word.
        cider = 0.0

    scores = {f"BLEU-{n}": float(bleu[n - 1]) for n in range(1, 5)}
    scores["ROUGE-L"] = float(rouge)
    scores["CIDEr-D"] = float(cider)
    return scores


# --- VQA answers ------------------------------------------------------------------------------------------------

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
    "thirteen": "13",
    "fourteen": "14",
    "fifteen": "15",
    "sixteen": "16",
    "seventeen": "17",
    "eighteen": "18",
    "nineteen": "19",
    "twenty": "20",
}

_ARTICLES = frozenset({"a", "an", "the"})

# Answers typed without an apostrophe, mapped to the spelled-out form so "dont" and "don't" compare equal. Words
# that are also ordinary words without one ("its", "lets", "hes", "well", "were", "shell") are left out.
_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldnt": "couldn't",
    "couldve": "could've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hasnt": "hasn't",
    "havent": "haven't",
    "im": "i'm",
    "isnt": "isn't",
    "ive": "i've",
    "shouldnt": "shouldn't",
    "shouldve": "should've",
    "thats": "that's",
    "theyre": "they're",
    "wasnt": "wasn't",
    "werent": "weren't",
    "whats": "what's",
    "wont": "won't",
    "wouldnt": "wouldn't",
    "wouldve": "would've",
    "youre": "you're",
}

_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")
# A period survives only before a digit, as a decimal point ("3.5", ".5": dropping it would turn ".5" into "5");
# an apostrophe only between word characters (a contraction or possessive, not a quote mark). All other
# punctuation, underscore included, becomes a space.
_PUNCTUATION = re.compile(r"\.(?!\d)|'(?!\w)|(?<!\w)'|[^\w\s.']|_")


def normalize_answer(text: str) -> str:
    """Normalise a short answer for VQAv2-style comparison.

    Rules, in order: lowercase; curly apostrophes become straight; commas between digits are dropped
    (``"1,000"`` -> ``"1000"``) so both spellings of a number match; a period is kept only before a digit, as a
    decimal point (``"3.5"`` stays, ``"Two."`` loses it); an apostrophe is kept only inside a word; any other
    punctuation becomes a space (``"t-shirt"`` -> ``"t shirt"``). Then per word: number words up to twenty and
    ``"none"`` become digits, the articles a/an/the are dropped, and apostrophe-less contractions are spelled out
    (``"dont"`` -> ``"don't"``). Words are re-joined with single spaces.
    """
    text = text.lower().replace("\u2019", "'")
    text = _THOUSANDS_COMMA.sub("", text)
    text = _PUNCTUATION.sub(" ", text)
    words = []
    for word in text.split():
        if word in _ARTICLES:
            continue
        word = _NUMBER_WORDS.get(word, word)
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def exact_match(prediction: str, reference: str) -> bool:
    """Whether the two answers are equal after :func:`normalize_answer`."""
    return normalize_answer(prediction) == normalize_answer(reference)


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """VQAv2 accuracy of one predicted answer against the human answers for its question.

    With two or more references: for each reference left out in turn, ``min(1, matches among the rest / 3)``, then
    the mean of those values, so with ten references 3 matches score 0.9 and 4 or more score 1.0. With a single
    reference there is nothing to leave out, so it is exact match (1.0 or 0.0). Everything is compared after
    :func:`normalize_answer`. Raises ``ValueError`` on an empty reference list.
    """
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    hits = [normalize_answer(ref) == pred for ref in references]
    if len(hits) == 1:
        return 1.0 if hits[0] else 0.0
    total = sum(hits)
    # Leaving out reference i leaves total - hits[i] matches among the others.
    return sum(min(1.0, (total - hit) / 3) for hit in hits) / len(hits)
