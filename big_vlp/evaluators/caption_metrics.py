"""Caption metrics in pure Python: corpus BLEU-4, CIDEr-D and exact match.

Every text is normalised the same way first: lowercased, punctuation characters deleted,
split on whitespace. BLEU-4 follows Papineni et al. (2002) at the corpus level, with no
smoothing; CIDEr-D follows Vedantam et al. (2015) as the coco-caption code computes it
(pycocoevalcap/cider/cider_scorer.py), so the numbers are comparable with papers' up to
the tokenizer (coco-caption uses the PTB tokenizer).
"""

import collections
import math
import string
from typing import Sequence

Ngrams = collections.Counter
MAX_N = 4
CIDER_SIGMA = 6.0
_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation)


def tokenize(text: str) -> list[str]:
  """Lowercased words of `text` with punctuation characters deleted."""
  return text.lower().translate(_DELETE_PUNCTUATION).split()


def normalize(text: str) -> str:
  """`text` as its tokens joined by single spaces (what exact match compares)."""
  return " ".join(tokenize(text))


def ngram_counts(words: Sequence[str], max_n: int = MAX_N) -> Ngrams:
  """Counts of every n-gram (a tuple of words) of `words` for n = 1..max_n."""
  counts = collections.Counter()
  for n in range(1, max_n + 1):
    for i in range(len(words) - n + 1):
      counts[tuple(words[i:i + n])] += 1
  return counts


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
  if len(hypotheses) != len(references):
    raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
  for i, refs in enumerate(references):
    if isinstance(refs, str) or not refs:
      raise ValueError(f"reference set {i} must be a non-empty list of strings, got {refs!r}")


def exact_match(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  """Fraction of hypotheses equal (normalised) to one of their references."""
  _check(hypotheses, references)
  if not hypotheses:
    return 0.0
  hits = sum(normalize(h) in {normalize(r) for r in refs}
             for h, refs in zip(hypotheses, references))
  return hits / len(hypotheses)


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
         max_n: int = MAX_N) -> float:
  """Corpus BLEU-max_n in [0, 1]: geometric mean of the corpus' clipped n-gram precisions
  times the brevity penalty exp(1 - r / c) when c < r, where c is the hypotheses' total
  length and r the sum over hypotheses of the reference length closest to each (ties go
  to the shorter reference). 0 when any precision is 0 (no smoothing)."""
  _check(hypotheses, references)
  matched, total = [0] * max_n, [0] * max_n
  hyp_len = ref_len = 0
  for hyp, refs in zip(hypotheses, references):
    words = tokenize(hyp)
    ref_words = [tokenize(r) for r in refs]
    hyp_len += len(words)
    ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
    max_ref = collections.Counter()
    for r in ref_words:
      max_ref |= ngram_counts(r, max_n)  # Union: the maximum count over the references.
    for gram, count in ngram_counts(words, max_n).items():
      matched[len(gram) - 1] += min(count, max_ref[gram])
      total[len(gram) - 1] += count
  if hyp_len == 0 or not all(matched):
    return 0.0
  log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / max_n
  brevity = min(0.0, 1.0 - ref_len / hyp_len)
  return math.exp(log_precision + brevity)


def _tfidf(counts: Ngrams, doc_freq: Ngrams, log_docs: float, max_n: int
           ) -> tuple[list[dict], list[float], int]:
  """(per-n TF-IDF vectors, their norms, length) as coco-caption's counts2vec: weight
  tf * (log N - log max(1, df)); the length is the number of bigrams, as there."""
  vec = [{} for _ in range(max_n)]
  norm = [0.0] * max_n
  length = 0
  for gram, tf in counts.items():
    n = len(gram) - 1
    weight = tf * (log_docs - math.log(max(1.0, doc_freq[gram])))
    vec[n][gram] = weight
    norm[n] += weight * weight
    if n == 1:
      length += tf
  return vec, [math.sqrt(x) for x in norm], length


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
            max_n: int = MAX_N, sigma: float = CIDER_SIGMA) -> float:
  """Corpus CIDEr-D (x10 scale; about 0..10 per reference set): per image, the mean over
  n = 1..max_n and over its references of the cosine of clipped TF-IDF n-gram vectors times
  exp(-(len_hyp - len_ref)^2 / (2 sigma^2)), times 10; averaged over images.

  Document frequencies are counted over the images' reference sets (an n-gram counts once
  per image) and the IDF is log(number of images) - log(max(1, df)).
  """
  _check(hypotheses, references)
  if not hypotheses:
    return 0.0
  ref_counts = [[ngram_counts(tokenize(r), max_n) for r in refs] for refs in references]
  doc_freq = collections.Counter()
  for counts in ref_counts:
    doc_freq.update(set().union(*counts))
  log_docs = math.log(float(len(references)))
  scores = []
  for hyp, refs in zip(hypotheses, ref_counts):
    vec, norm, length = _tfidf(ngram_counts(tokenize(hyp), max_n), doc_freq, log_docs, max_n)
    total = [0.0] * max_n
    for ref in refs:
      rvec, rnorm, rlength = _tfidf(ref, doc_freq, log_docs, max_n)
      penalty = math.exp(-((length - rlength) ** 2) / (2 * sigma ** 2))
      for n in range(max_n):
        # CIDEr-D clips the hypothesis' weights by the reference's.
        val = sum(min(w, rvec[n].get(g, 0.0)) * rvec[n].get(g, 0.0)
                  for g, w in vec[n].items())
        if norm[n] and rnorm[n]:
          val /= norm[n] * rnorm[n]
        total[n] += val * penalty
    scores.append(10.0 * sum(total) / max_n / len(refs))
  return sum(scores) / len(scores)


def caption_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]
                    ) -> dict[str, float]:
  """{'exact_match', 'bleu4' (fractions), 'cider' (CIDEr-D, x10 scale)} of a corpus:
  hypotheses[i] is the caption generated for image i, references[i] that image's captions."""
  return {"exact_match": exact_match(hypotheses, references),
          "bleu4": bleu(hypotheses, references),
          "cider": cider_d(hypotheses, references)}
