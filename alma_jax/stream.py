"""The stream of mega-batches: arrivals, waiting time, replay. Indices only, no data.

The training set is cut once into T mega-batches by one seeded permutation and an equal split
(the reference's `numpy.random.seed(432)`, `permutation`, `array_split`:
crlapi/sl/streams/mnist.py:51-54, the seed in configs/mnist/*.yaml). Every mega-batch holds
out a fixed `validation_fraction` of its examples for early stopping, so a replayed example keeps
its role. The stream state (`StreamState`) is plain data (counters and a mask) inside the run state.
"""
from __future__ import annotations

import dataclasses

from flax import serialization
import flax.struct
import numpy as np



@dataclasses.dataclass(frozen=True)
class Round:
  """What one training round sees: indices into the training set."""
  train: np.ndarray
  valid: np.ndarray


@dataclasses.dataclass(frozen=True)
class Stream:
  """The fixed part of a stream: its mega-batches, each split into (train, valid) indices."""
  train: tuple[np.ndarray, ...]
  valid: tuple[np.ndarray, ...]

  @property
  def num_megabatches(self) -> int:
    return len(self.train)

  @property
  def num_examples(self) -> int:
    return sum(len(a) for a in self.train + self.valid)


def make_stream(num_examples: int, num_megabatches: int, seed: int = 432,
                validation_fraction: float = 0.1) -> Stream:
  if 2 * num_megabatches > num_examples:
    raise ValueError(f'config.stream.num_megabatches={num_megabatches}: mega-batches of '
                     f'{num_examples // num_megabatches} of the {num_examples} training examples; '
                     f'each needs at least 2 (one to validate on, one to train on)')
  permutation = np.random.RandomState(seed).permutation(num_examples).astype(np.int32)
  train, valid = [], []
  for k, chunk in enumerate(np.array_split(permutation, num_megabatches)):
    held_out = np.random.RandomState([seed, k]).permutation(len(chunk))
    n_valid = min(max(1, int(round(validation_fraction * len(chunk)))), len(chunk) - 1)
    valid.append(np.sort(chunk[held_out[:n_valid]]))
    train.append(np.sort(chunk[held_out[n_valid:]]))
  return Stream(tuple(train), tuple(valid))


REPLAY = ('none', 'all', 'fraction', 'reservoir')


def check(c) -> None:
  """Raises ValueError naming the first bad key of the `stream` section."""
  from alma_jax.config import fail
  if not 0 <= c.permutation_seed < 2 ** 32:
    fail('stream.permutation_seed', c.permutation_seed, 'must be in [0, 2**32)')
  if c.num_megabatches < 1:
    fail('stream.num_megabatches', c.num_megabatches, 'must be >= 1')
  if not 1 <= c.waiting_time <= c.num_megabatches:
    fail('stream.waiting_time', c.waiting_time,
         f'the waiting time must be between 1 and num_megabatches={c.num_megabatches}')
  if c.replay not in REPLAY:
    fail('stream.replay', c.replay, f'must be one of {", ".join(map(repr, REPLAY))}')
  for key in ('replay_fraction', 'validation_replay_fraction'):
    if c.get(key) is not None and not 0.0 <= c[key] <= 1.0:
      fail(f'stream.{key}', c[key], 'must be in [0, 1]')
  if not 0.0 < c.validation_fraction < 1.0:
    fail('stream.validation_fraction', c.validation_fraction, 'must be in (0, 1)')
  if c.replay == 'reservoir' and reservoir_split(c)[0] < 1:
    fail('stream.reservoir_size', c.reservoir_size, 'leaves no room for training examples '
         f'beside the validation share (stream.validation_fraction={c.validation_fraction})')


def reservoir_split(c) -> tuple[int, int]:
  """The reservoir's places for training and for validation examples."""
  size_valid = max(1, int(round(c.validation_fraction * c.reservoir_size)))
  return c.reservoir_size - size_valid, size_valid


def should_train(t: int, waiting_time: int, num_megabatches: int, train_on_last: bool) -> bool:
  """Whether a round runs after arrival t (1-based): at t = w, 2w, ... (and T if asked)."""
  return t % waiting_time == 0 or (train_on_last and t == num_megabatches)


@flax.struct.dataclass
class StreamState:
  """Where a stream stands: arrivals so far, the arrival of the last round, the replay memory
  (a mask over the training set), and the examples offered to a reservoir so far."""
  arrivals: np.ndarray
  last_round: np.ndarray
  memory: np.ndarray
  seen_train: np.ndarray
  seen_valid: np.ndarray

  def to_tree(self) -> dict:
    """The plain tree a checkpoint holds."""
    return serialization.to_state_dict(self)

  @classmethod
  def from_tree(cls, tree: dict) -> 'StreamState':
    return cls(**{name: np.asarray(tree[name]) for name in cls.__dataclass_fields__})


def init_state(num_examples: int) -> StreamState:
  """Nothing arrived or trained yet; the replay memory is empty."""
  return StreamState(np.int64(0), np.int64(0), np.zeros(num_examples, bool), np.int64(0),
                     np.int64(0))


def arrive(state: StreamState) -> StreamState:
  return state.replace(arrivals=np.int64(state.arrivals + 1))


def held_examples(state: StreamState, stream: Stream, config) -> int:
  """Examples (training and validation) a learner holds after the arrivals of `state` for
  the rounds to come (`config`: the `stream` section): the mega-batches waiting for their
  round, and the replay memory (with replay='all', every example arrived so far); none once
  no round is to come."""
  t, last = int(state.arrivals), int(state.last_round)
  if not any(should_train(u, config.waiting_time, stream.num_megabatches, config.train_on_last)
             for u in range(t + 1, stream.num_megabatches + 1)):
    return 0
  if config.replay == 'all':
    return sum(len(x) for x in stream.train[:t] + stream.valid[:t])
  waiting = sum(len(x) for x in stream.train[last:t] + stream.valid[last:t])
  return waiting + int(np.sum(state.memory))


def _subsample(indices: np.ndarray, fraction: float, rng) -> np.ndarray:
  return rng.choice(indices, int(round(fraction * len(indices))), replace=False)


def _reservoir(memory: np.ndarray, seen: int, new: np.ndarray, size: int, rng) -> tuple:
  """Reservoir sampling: keeps a uniform sample of at most `size` of all examples offered."""
  memory = list(memory)
  for index in new:
    seen += 1
    if len(memory) < size:
      memory.append(index)
    elif rng.integers(seen) < size:
      memory[rng.integers(size)] = index
  return np.asarray(memory, np.int32), seen


def next_round(state: StreamState, stream: Stream, config,
               seed: int) -> tuple[Round, StreamState]:
  """The data of the round run now (after arrival `state.arrivals`) and the next state.

  Replay policies (`config` is the `stream` section):
    none       the mega-batches that arrived since the last round;
    all        every mega-batch so far;
    fraction   the new mega-batches plus a fresh sample of `replay_fraction` of the replay memory's
               training examples (`validation_replay_fraction` of its validation examples; None:
               the same fraction), which then becomes this round's data, so old data decays
               geometrically (reference: crlapi/sl/clmodels/core.py:126-142);
    reservoir  the new mega-batches plus a uniform reservoir of at most `reservoir_size` past
               examples (ours).
  Validation examples stay validation examples when replayed.
  """
  t, last = int(state.arrivals), int(state.last_round)
  new_train = np.concatenate(stream.train[last:t])
  new_valid = np.concatenate(stream.valid[last:t])
  rng = np.random.default_rng([seed, t])
  memory = state.memory.copy()
  is_valid = np.zeros_like(memory)
  is_valid[np.concatenate(stream.valid)] = True
  old_train = np.flatnonzero(memory & ~is_valid).astype(np.int32)
  old_valid = np.flatnonzero(memory & is_valid).astype(np.int32)
  seen_train, seen_valid = int(state.seen_train), int(state.seen_valid)
  policy = config.replay
  if policy == 'none':
    train, valid = new_train, new_valid
  elif policy == 'all':
    train, valid = np.concatenate(stream.train[:t]), np.concatenate(stream.valid[:t])
  elif policy == 'fraction':
    train = np.concatenate([new_train, _subsample(old_train, config.replay_fraction, rng)])
    fraction = config.get('validation_replay_fraction')
    fraction = config.replay_fraction if fraction is None else fraction
    valid = np.concatenate([new_valid, _subsample(old_valid, fraction, rng)])
    memory[:] = False
    memory[train] = memory[valid] = True
  elif policy == 'reservoir':
    train = np.concatenate([new_train, old_train])
    valid = np.concatenate([new_valid, old_valid])
    size_train, size_valid = reservoir_split(config)
    kept_train, seen_train = _reservoir(old_train, seen_train, new_train, size_train, rng)
    kept_valid, seen_valid = _reservoir(old_valid, seen_valid, new_valid, size_valid, rng)
    memory[:] = False
    memory[kept_train] = memory[kept_valid] = True
  else:
    raise ValueError(f'config.stream.replay={policy!r}: unknown replay policy')
  new_state = state.replace(last_round=np.int64(t), memory=memory,
                            seen_train=np.int64(seen_train), seen_valid=np.int64(seen_valid))
  return Round(train.astype(np.int32), valid.astype(np.int32)), new_state
