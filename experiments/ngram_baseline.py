"""A byte n-gram baseline for the language model: interpolated Kneser-Ney, fitted to the same
training text that the LM config's stream trains on, scored on the same test targets.

    python experiments/ngram_baseline.py [--config=configs/lm.py] [--order=3]

Writes experiments/results/lm/ngram.json with the test cross-entropy (nats per byte), bits per
byte and perplexity. Discounts follow Ney et al.: D = n1 / (n1 + 2 n2) per order, n1 and n2 the
numbers of n-grams seen once and twice; the lowest order interpolates with the uniform
distribution over the 256 bytes, so no byte has probability 0.
"""
from __future__ import annotations

import math

import common
import numpy as np

V = 256


def contiguous(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """The packed sequences back as the text they were cut from."""
  return np.concatenate([inputs.reshape(-1), targets[-1, -1:]]).astype(np.int64)


class KneserNey:
  """Interpolated Kneser-Ney over bytes, of any order >= 1."""

  def __init__(self, text: np.ndarray, order: int):
    self.order = order
    self.tables = []  # per n: (sorted n-gram codes, counts used at that order)
    for n in range(1, order + 1):
      grams = self._codes(text, n)
      codes, counts = np.unique(grams, return_counts=True)
      if n < order:  # lower orders use continuation counts: distinct left extensions
        longer = np.unique(self._codes(text, n + 1))
        codes, counts = np.unique(longer % V ** n, return_counts=True)
      n1, n2 = np.sum(counts == 1), np.sum(counts == 2)
      discount = n1 / (n1 + 2 * n2) if n1 + 2 * n2 else 0.5
      context = codes // V
      ctx_codes, first = np.unique(context, return_index=True)
      ctx_totals = np.add.reduceat(counts, first)
      ctx_types = np.diff(np.append(first, len(codes)))
      self.tables.append((codes, counts, discount, ctx_codes, ctx_totals, ctx_types))

  @staticmethod
  def _codes(text, n):
    out = np.zeros(len(text) - n + 1, np.int64)
    for i in range(n):
      out = out * V + text[i:len(text) - n + 1 + i]
    return out

  @staticmethod
  def _lookup(keys, codes, values, default=0):
    i = np.searchsorted(codes, keys)
    i = np.minimum(i, len(codes) - 1)
    found = codes[i] == keys
    return np.where(found, values[i], default), found

  def probabilities(self, histories: np.ndarray, nexts: np.ndarray) -> np.ndarray:
    """P(next | the last order-1 bytes of each history (rows of order-1 bytes))."""
    p = np.full(len(nexts), 1.0 / V)
    for n in range(1, self.order + 1):
      codes, counts, discount, ctx_codes, ctx_totals, ctx_types = self.tables[n - 1]
      context = np.zeros(len(nexts), np.int64)
      for j in range(n - 1):
        context = context * V + histories[:, self.order - n + j]
      count, _ = self._lookup(context * V + nexts, codes, counts)
      total, seen = self._lookup(context, ctx_codes, ctx_totals, 1)
      types, _ = self._lookup(context, ctx_codes, ctx_types)
      higher = (np.maximum(count - discount, 0) + discount * types * p) / total
      p = np.where(seen, higher, p)
    return p


def main():
  args, _, dataset = common.lm_script(__doc__, 'experiments/results/lm/ngram.json', order=3)
  train = contiguous(dataset.train_images, dataset.train_labels)
  model = KneserNey(train, args.order)
  # The LM's test targets, each with the order-1 bytes before it in the test text.
  test = contiguous(dataset.test_images, dataset.test_labels)
  k = np.arange(1, len(test))  # target positions: every byte after the first
  padded = np.concatenate([np.zeros(args.order - 1, np.int64), test])
  histories = np.stack([padded[k + j] for j in range(args.order - 1)], 1) if args.order > 1 \
      else np.zeros((len(k), 0), np.int64)
  nll = -np.log(model.probabilities(histories, test[k]))
  loss = float(nll.mean())
  result = {**common.environment(), 'config': args.config, 'order': args.order,
            'train_bytes': int(len(train)), 'test_targets': int(len(k)), 'test_loss': loss,
            'bits_per_byte': loss / math.log(2), 'perplexity': math.exp(loss)}
  common.write_result(result, args.out)


if __name__ == '__main__':
  main()
