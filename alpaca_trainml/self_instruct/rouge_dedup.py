"""The original Alpaca dedup: drop a new instruction whose ROUGE-L F-measure against any seed or kept instruction is
above 0.7, with the same scores and decisions as rouge_score, at C speed (rapidfuzz's LCS on token codes, one matrix
per batch instead of a multiprocessing.Pool per candidate). self_instruct/generate.py uses it; benchmarks/dedup.py
compares it with the original.
"""

import numpy as np
from rapidfuzz import process as rf_process
from rapidfuzz.distance import LCSseq
from rouge_score import tokenize as rouge_tokenize  # the function DefaultTokenizer calls, without nltk's import cost


def similarity_fields(scores, pool):
    """The original's extra fields: the 10 most similar earlier instructions and the mean score over all of them."""
    top = np.argsort(scores)[-10:][::-1]  # same call as the original, so ties break the same way
    return {
        "most_similar_instructions": {pool[i]: float(scores[i]) for i in top},
        "avg_similarity_score": float(np.mean(scores)),
    }


def rouge_f_measures(lcs, target_len, prediction_lens):
    """rouge_score's _score_lcs F-measure for one target against many predictions, same float operations.

    lcs: (n,) LCS lengths in tokens; target_len: tokens in the new instruction; prediction_lens: (n,) tokens in each."""
    lcs = np.asarray(lcs, dtype=np.float64)
    prediction_lens = np.asarray(prediction_lens, dtype=np.float64)
    if target_len == 0:
        return np.zeros(len(lcs))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / prediction_lens
        recall = lcs / target_len
        fmeasure = 2 * precision * recall / (precision + recall)
    return np.where(lcs > 0, fmeasure, 0.0)  # lcs == 0 (or an empty prediction): rouge_score returns 0


class RougeLDeduper:
    """Keeps a pool of instructions; decides keep/drop for new ones as the original did, without a Pool per candidate.

    Each instruction is tokenized once with rouge_score's tokenizer (no stemming, as RougeScorer(["rougeL"]) in the
    original), and each distinct token becomes one code point, so rapidfuzz's LCSseq runs on short strings."""

    def __init__(self, instructions=(), threshold=0.7, workers=1):
        self.threshold = threshold  # drop when the best F-measure is above this
        self.workers = workers  # rapidfuzz threads for the candidates-against-pool matrix
        self.instructions, self._codes, self._token_ids = [], [], {}
        self._lens = np.zeros(0)
        self.add([*instructions])

    def encode(self, text):
        """rouge_score's tokens for text, one code point per distinct token."""
        chars = []
        for token in rouge_tokenize.tokenize(text, None):
            cp = self._token_ids.setdefault(token, len(self._token_ids))
            chars.append(chr(cp if cp < 0xD800 else cp + 0x800))  # skip the surrogate block; ~1.1M tokens possible
        return "".join(chars)

    def add(self, instructions, codes=None):
        codes = codes if codes is not None else [self.encode(t) for t in instructions]
        self.instructions += instructions
        self._codes += codes
        self._lens = np.concatenate([self._lens, [len(c) for c in codes]])

    def scores(self, code, pool_codes, pool_lens):
        lcs = rf_process.cdist([code], pool_codes, scorer=LCSseq.similarity, dtype=np.int32)[0] if pool_codes else []
        return rouge_f_measures(lcs, len(code), pool_lens)

    def filter_batch(self, instructions):
        """[(keep, scores)] for new instructions in order, each scored against the pool plus those kept before it.

        scores: (pool size at that moment,) F-measures in pool order, so self.instructions[i] pairs with scores[i]."""
        codes = [self.encode(t) for t in instructions]
        # threads only pay off on a big matrix: 1e6 pairs is ~25 ms of LCS on one core
        workers = self.workers if len(codes) * len(self._codes) >= 1_000_000 else 1
        base = (
            rf_process.cdist(codes, self._codes, scorer=LCSseq.similarity, dtype=np.int32, workers=workers)
            if codes and self._codes
            else np.zeros((len(codes), 0), dtype=np.int32)
        )
        results, kept, kept_codes = [], [], []
        for text, code, lcs in zip(instructions, codes, base):
            scores = np.concatenate(
                [
                    rouge_f_measures(lcs, len(code), self._lens),
                    self.scores(code, kept_codes, [len(c) for c in kept_codes]),
                ]
            )
            keep = scores.size == 0 or scores.max() <= self.threshold
            results.append((keep, scores))
            if keep:
                kept.append(text)
                kept_codes.append(code)
        self.add(kept, kept_codes)
        return results
