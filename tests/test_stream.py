import ml_collections
import numpy as np
import pytest

from alma_jax import stream as alma_stream


def stream_config(**overrides):
  c = dict(replay='none', replay_fraction=0.5, reservoir_size=100, validation_fraction=0.1)
  c.update(overrides)
  return ml_collections.ConfigDict(c)


def test_megabatches_are_a_deterministic_partition_of_equal_size():
  s = alma_stream.make_stream(1003, 10, seed=432)
  everything = np.concatenate(s.train + s.valid)
  assert sorted(everything.tolist()) == list(range(1003))  # complete and disjoint
  sizes = [len(a) + len(b) for a, b in zip(s.train, s.valid)]
  assert max(sizes) - min(sizes) <= 1
  again = alma_stream.make_stream(1003, 10, seed=432)
  assert all(np.array_equal(a, b) for a, b in zip(s.train + s.valid, again.train + again.valid))
  other = alma_stream.make_stream(1003, 10, seed=1)
  assert not np.array_equal(s.train[0], other.train[0])


def test_megabatch_k_follows_the_reference_permutation():
  s = alma_stream.make_stream(500, 5, seed=432)
  chunks = np.array_split(np.random.RandomState(432).permutation(500), 5)
  for k, chunk in enumerate(chunks):
    assert sorted(np.concatenate([s.train[k], s.valid[k]]).tolist()) == sorted(chunk.tolist())
    assert len(s.valid[k]) == 10  # 10% held out of every mega-batch


@pytest.mark.parametrize('w,last,expected', [
    (1, False, list(range(1, 11))),
    (3, False, [3, 6, 9]),
    (3, True, [3, 6, 9, 10]),
    (10, False, [10]),
])
def test_waiting_time_schedule(w, last, expected):
  assert [t for t in range(1, 11) if alma_stream.should_train(t, w, 10, last)] == expected


def rounds(policy, w=1, t_max=6, **overrides):
  s = alma_stream.make_stream(600, 6, seed=432)
  state = alma_stream.init_state(600)
  out = []
  for t in range(1, t_max + 1):
    state = alma_stream.arrive(state)
    if alma_stream.should_train(t, w, 6, False):
      r, state = alma_stream.next_round(state, s, stream_config(replay=policy, **overrides), 0)
      out.append(r)
  return s, out


def test_no_replay_trains_on_what_arrived_since_the_last_round():
  s, rs = rounds('none', w=2)
  assert len(rs) == 3
  for i, r in enumerate(rs):
    assert sorted(r.train) == sorted(np.concatenate(s.train[2 * i:2 * i + 2]))
    assert sorted(r.valid) == sorted(np.concatenate(s.valid[2 * i:2 * i + 2]))


def test_replay_all_trains_on_everything_so_far():
  s, rs = rounds('all')
  for t, r in enumerate(rs, start=1):
    assert sorted(r.train) == sorted(np.concatenate(s.train[:t]))
    assert sorted(r.valid) == sorted(np.concatenate(s.valid[:t]))


def test_fraction_replay_resamples_a_fraction_of_the_previous_round():
  s, rs = rounds('fraction', replay_fraction=0.5)
  for t in range(1, len(rs)):
    previous, r, new = set(rs[t - 1].train.tolist()), rs[t], set(s.train[t].tolist())
    replayed = set(r.train.tolist()) - new
    assert new <= set(r.train.tolist())
    assert replayed <= previous and len(replayed) == round(0.5 * len(previous))
    assert set(r.valid.tolist()) - set(s.valid[t].tolist()) <= set(rs[t - 1].valid.tolist())
  # so old data decays geometrically: mega-batch 0 keeps about 1/2, 1/4, ... of its examples
  first = set(s.train[0].tolist())
  kept = [len(first & set(r.train.tolist())) for r in rs]
  assert kept[0] == len(first) and kept[-1] < kept[2] < kept[0]


@pytest.mark.parametrize('valid_fraction', [0.0, 1.0])
def test_fraction_replay_may_replay_validation_examples_at_their_own_fraction(valid_fraction):
  """The reference's separate train_ and validation_replay_proportion (core.py:126-139)."""
  s, rs = rounds('fraction', replay_fraction=0.5, validation_replay_fraction=valid_fraction)
  for t in range(1, len(rs)):
    replayed_valid = set(rs[t].valid.tolist()) - set(s.valid[t].tolist())
    assert len(replayed_valid) == round(valid_fraction * len(rs[t - 1].valid))
    replayed_train = set(rs[t].train.tolist()) - set(s.train[t].tolist())
    assert len(replayed_train) == round(0.5 * len(rs[t - 1].train))


def test_reservoir_is_bounded_and_holds_only_past_examples():
  s, rs = rounds('reservoir', reservoir_size=50)
  for t, r in enumerate(rs, start=1):
    new = set(s.train[t - 1].tolist())
    old = set(r.train.tolist()) - new
    assert len(old) <= 45 and len(set(r.valid.tolist()) - set(s.valid[t - 1].tolist())) <= 5
    assert old <= set(np.concatenate(s.train[:t - 1]).tolist()) if t > 1 else not old
  assert len(set(rs[-1].train.tolist()) - set(s.train[5].tolist())) == 45


def test_rounds_are_deterministic():
  _, a = rounds('fraction')
  _, b = rounds('fraction')
  assert all(np.array_equal(x.train, y.train) for x, y in zip(a, b))


def test_every_megabatch_has_an_example_to_validate_on_and_one_to_train_on():
  with pytest.raises(ValueError, match='num_megabatches=10: mega-batches of 1 of the 15'):
    alma_stream.make_stream(15, 10)  # (five would have trained on nothing)
  for fraction in (0.1, 0.8):  # (0.8 of 2 rounds to both)
    s = alma_stream.make_stream(20, 10, validation_fraction=fraction)
    assert all(len(t) == 1 for t in s.train) and all(len(v) == 1 for v in s.valid)


@pytest.mark.parametrize('policy,w,expected', [
    ('none', 2, [100, 0, 100, 0, 100, 0]),    # what waits for its round
    ('all', 2, [100, 200, 300, 400, 500, 0]),  # everything, round or not, while one is to come
    ('all', 4, [100, 200, 300, 0, 0, 0]),      # (arrivals 5 and 6 wait for no round)
    ('reservoir', 1, [50] * 5 + [0]),          # the reservoir (45 + 5), refilled each round
    ('fraction', 1, None)])                    # the last round's data, to resample from
def test_the_examples_held_are_those_waiting_and_the_replay_memory(policy, w, expected):
  s = alma_stream.make_stream(600, 6, seed=432)
  c = stream_config(replay=policy, reservoir_size=50, waiting_time=w, train_on_last=False)
  state, held, rounds = alma_stream.init_state(600), [], []
  for t in range(1, 7):
    state = alma_stream.arrive(state)
    if alma_stream.should_train(t, w, 6, False):
      r, state = alma_stream.next_round(state, s, c, 0)
      rounds.append(r)
    held.append(alma_stream.held_examples(state, s, c))
  if expected is None:
    assert held[-2] == len(rounds[-2].train) + len(rounds[-2].valid) > 100 and held[-1] == 0
  else:
    assert held == expected
