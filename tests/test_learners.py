"""Ensembles and growing learners: growth, parameter counts, vmapped members, resume."""
import contextlib
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alma_jax import backend, config as alma_config, data as alma_data, learners, run, sharding
from alma_jax import optim, steps, stream as alma_stream
from alma_jax.learners import boosting, members, moe as moe_learner
from alma_jax.models import moe as moe_model
from alma_jax.placement import device_data

# Every learner over a model it trains, and some over the mixture-of-experts MLP.
ALL = [(name, 'moe_mlp' if name == 'gmoe' else 'mlp') for name in learners.names()] + [
    ('gens', 'moe_mlp'), ('bagging', 'moe_mlp')]


def make_learner(config, name, model=None, **learner_overrides):
  config.learner.name = name
  config.model.name = model or ('moe_mlp' if name == 'gmoe' else config.model.name)
  config.learner.update(learner_overrides)
  dataset = alma_data.load(config.data)
  mesh = sharding.make_mesh()
  return learners.create(config, dataset, device_data(dataset, mesh), mesh), dataset


def first_round(dataset, config):
  s = alma_stream.make_stream(len(dataset.train_labels), config.stream.num_megabatches)
  state = alma_stream.arrive(alma_stream.init_state(s.num_examples))
  return alma_stream.next_round(state, s, config.stream, 0)[0]


def errors(workdir):
  with open(os.path.join(workdir, run.METRICS_FILE)) as f:
    return [json.loads(line)['test_error'] for line in f]


@pytest.mark.parametrize('name, model', ALL)
def test_every_learner_runs_and_resumes_mid_stream_exactly(config, tmp_path, name, model):
  config.learner.name = name
  config.model.name = model
  config.stream.num_megabatches = 3
  config.train.update(max_epochs=3, patience=2)
  straight = run.run(config, str(tmp_path / 'straight'))
  rows = [json.loads(l) for l in open(tmp_path / 'straight' / run.METRICS_FILE)]
  assert min(r['test_error'] for r in rows) < 0.8  # chance is 0.9: it learns
  assert straight['train_flops'] > 0 and straight['inference_flops'] > 0
  # A run stopped after arrival 2 (its last checkpoint gone, as if killed) resumes to the same end.
  shutil.copytree(tmp_path / 'straight', tmp_path / 'stopped')
  shutil.rmtree(tmp_path / 'stopped' / 'checkpoints' / '3')
  for name in (run.METRICS_FILE, run.SUMMARY_FILE):  # the rows must come from the resumed run
    os.remove(tmp_path / 'stopped' / name)
  kept = os.path.getmtime(tmp_path / 'stopped' / 'checkpoints' / '2')
  resumed = run.run(config, str(tmp_path / 'stopped'))
  assert os.path.getmtime(tmp_path / 'stopped' / 'checkpoints' / '2') == kept  # resumed, not redone
  assert errors(tmp_path / 'stopped') == errors(tmp_path / 'straight')
  assert resumed['params'] == straight['params']


def member_count_params(learner, state):
  one = jax.tree.map(lambda p: p[:1], state.variables)
  return learner.num_members(state), learner.params(state.replace(variables=one))


def test_gens_grows_one_member_per_round_and_params_count_all_members(config):
  learner, dataset = make_learner(config, 'gens')
  state = learner.init(jax.random.key(0))
  r = first_round(dataset, config)
  counts = []
  for t in range(3):
    state, _ = learner.train_round(state, r, jax.random.key(t))
    members, per_member = member_count_params(learner, state)
    counts.append(members)
    assert learner.params(state) == members * per_member
    assert learner.inference_flops(state) == pytest.approx(members * learner.flops()['forward'])
  assert counts == [1, 2, 3]


def test_a_stack_of_members_is_taken_repeated_padded_and_appended_in_one_program_each(config):
  """What growing ensembles do to their stacks every round compiles one program per stack, not
  one per leaf shape (as eager ops would): 6 leaves of shapes that no other test uses."""
  learner, _ = make_learner(config, 'gens')
  stack = {f'w{i}': jnp.ones((3, 41 + i, 3)) for i in range(6)}
  one = {f'w{i}': jnp.ones((1, 41 + i, 3)) for i in range(6)}
  state, new_weight = members.MembersState(stack, jnp.ones(3), np.int64(1)), jnp.ones(1)
  for operation in (lambda: learner.member(stack, -1), lambda: learner.repeat(one, 2),
                    lambda: members.padded_members(stack, state.member_weights),
                    lambda: members.append(learner, state, one, None, None, new_weight)):
    with backend.Compilations() as compiled:
      jax.block_until_ready(jax.tree.leaves(operation()))
    assert compiled.count == 1


def test_a_copied_gens_member_starts_as_the_function_of_the_last(config):
  learner, dataset = make_learner(config, 'gens')
  state = learner.init(jax.random.key(0))
  state, _ = learner.train_round(state, first_round(dataset, config), jax.random.key(1))
  x = dataset.test_images[:64]
  before = learner.ensemble(state.variables, state.member_weights, x)[0]
  start = learner.plan.work(learner, state, first_round(dataset, config), jax.random.key(2)).start
  grown = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), state.variables, start)
  logits = jax.vmap(learner.apply_fn, (0, None))(grown, x)
  np.testing.assert_array_equal(logits[-1], logits[-2])  # the new member is the last one
  # With one member so far, the ensemble's mean logits are unchanged by the copy.
  after = learner.ensemble(grown, jnp.ones(2), x)[0]
  np.testing.assert_allclose(after, before, atol=1e-6)
  # With two (different) members, the third starts as the last, not the first.
  state, _ = learner.train_round(state, first_round(dataset, config), jax.random.key(3))
  start = learner.plan.work(learner, state, first_round(dataset, config), jax.random.key(4)).start
  logits = jax.vmap(learner.apply_fn, (0, None))(
      jax.tree.map(lambda a, b: jnp.concatenate([a, b]), state.variables, start), x)
  np.testing.assert_array_equal(logits[2], logits[1])
  assert not np.allclose(logits[2], logits[0], atol=1e-3)


def test_from_scratch_starts_every_round_fresh_and_finetune_where_it_left_off(config):
  rounds = {}
  for name in ('from_scratch', 'finetune'):
    learner, dataset = make_learner(config, name)
    state = learner.init(jax.random.key(0))
    state, _ = learner.train_round(state, first_round(dataset, config), jax.random.key(1))
    key = jax.random.key(2)
    rounds[name] = (learner.plan.work(learner, state, first_round(dataset, config), key).start,
                    state.variables, learner.new_members(key, 1))
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                                 jax.tree.leaves(b)))
  start, trained, fresh = rounds['from_scratch']
  assert same(start, fresh) and not same(start, trained)
  start, trained, fresh = rounds['finetune']
  assert same(start, trained) and not same(start, fresh)


@pytest.mark.parametrize('name,k', [('k_ensemble', 3), ('bagging', 3), ('agg_ensemble', 3)])
def test_ensembles_hold_k_members(config, name, k):
  learner, dataset = make_learner(config, name, num_members=k)
  single, _ = make_learner(config, 'finetune')
  state = learner.init(jax.random.key(0))
  per_member = single.params(single.init(jax.random.key(0)))
  assert learner.params(state) == k * per_member
  state, report = learner.train_round(state, first_round(dataset, config), jax.random.key(1))
  grows = name == 'bagging'
  state, _ = learner.train_round(state, first_round(dataset, config), jax.random.key(2))
  assert learner.params(state) == (2 * k if grows else k) * per_member
  trained = 1 if name == 'agg_ensemble' else k  # agg: one model holding the k members
  assert report.train_flops == pytest.approx(trained * report.steps * learner.flops()['step'])


def test_vmapped_members_train_exactly_like_members_alone(config):
  learner, dataset = make_learner(config, 'k_ensemble', num_members=3)
  trainer = learner.trainer
  params = learner.new_members(jax.random.key(0), 3)
  opt = learner.init_optimizer(params)
  r = first_round(dataset, config)
  idx, n = steps.pad_indices(np.broadcast_to(r.train, (3, len(r.train))), trainer.batch_size)
  weights = (np.arange(idx.shape[1]) < n).astype(np.float32)[None].repeat(3, 0)
  keys = jax.random.split(jax.random.key(5), 3)
  copy = lambda t: jax.tree.map(jnp.copy, t)
  together, _ = trainer.train_epoch(copy(params), copy(opt), learner.data.train_images,
                                    learner.data.train_labels, idx, weights, n, keys, 0)
  for m in range(3):
    alone, _ = trainer.train_epoch(copy(learner.member(params, m)), copy(learner.member(opt, m)),
                                   learner.data.train_images, learner.data.train_labels,
                                   idx[m:m + 1], weights[m:m + 1], n, keys[m:m + 1], 0)
    for a, b in zip(jax.tree.leaves(learner.member(together, m)), jax.tree.leaves(alone)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # and the members really differ: each had its own shuffling
  leaves = jax.tree.leaves(together)[0]
  assert not np.allclose(leaves[0], leaves[1])


@pytest.mark.parametrize('max_epochs, delta', [(6, 0.5), (4, 0.0)])  # stops at 2; runs all 4
def test_early_stopping_keeps_each_members_best_epoch_and_counts_the_epochs_trained(
    config, monkeypatch, max_epochs, delta):
  """Each epoch trains, then is scored on the validation set; a round stops once no member has
  improved on its best by more than `patience_delta` for `patience` epochs, and each member
  leaves it with its variables of its best epoch."""
  config.train.update(max_epochs=max_epochs, patience=1, patience_delta=delta)
  learner, dataset = make_learner(config, 'k_ensemble', num_members=3)
  r = first_round(dataset, config)
  state = learner.init(jax.random.key(0))
  events, trained, scores = [], [], []
  epoch_of = steps.Trainer.train_epoch

  def train_epoch(self, *args, **kwargs):
    events.append(('train', args[8]))
    out = epoch_of(self, *args, **kwargs)
    trained.append(jax.device_get(out[0]))  # (the next epoch donates them)
    return out
  monkeypatch.setattr(steps.Trainer, 'train_epoch', train_epoch)
  scored = lambda epoch, score: events.append(('scored', epoch)) or scores.append(score)
  monkeypatch.setattr(members, 'RoundProgress', lambda *a: contextlib.nullcontext(scored))
  new, report = learner.train_round(state, r, jax.random.key(1))
  epochs = report.epochs
  assert epochs == (2 if delta else max_epochs) == len(trained)
  assert events == [(kind, e) for e in range(epochs) for kind in ('train', 'scored')]
  assert report.train_examples == epochs * len(r.train) * 3
  for m in range(3):  # the last epoch that improved on the member's best by more than delta
    best, kept = -np.inf, None
    for e in range(epochs):
      if scores[e][m] > best + delta:
        best, kept = scores[e][m], e
    for a, b in zip(jax.tree.leaves(new.variables), jax.tree.leaves(trained[kept])):
      np.testing.assert_array_equal(np.asarray(a)[m], b[m])


@pytest.mark.parametrize('growth, grow_every', [('usage', 1), ('random', 2)])
def test_gmoe_adds_one_expert_per_mixture_layer_per_growth(config, growth, grow_every):
  """Growth after every g rounds trained, never before the first (the reference's
  crlapi/sl/clmodels/finetune_grow.py:47-53: MNIST h=64, T=10, g=1 ends with 616,050
  parameters, 111,150 + 9 growths of 56,100)."""
  learner, dataset = make_learner(config, 'gmoe', grow_every=grow_every, growth=growth)
  state = learner.init(jax.random.key(0))
  r = first_round(dataset, config)
  h, d = config.model.hidden, 144
  # +1 expert and +1 gate of 2 outputs per layer: layer 0 sees the input, layer 1 the hidden
  added = (d * h + h) + (d * 2 + 2) + (h * h + h) + (h * 2 + 2)
  start = learner.params(state)
  params, leaves = [], []
  for t in range(4):
    state, _ = learner.train_round(state, r, jax.random.key(t))
    params.append(learner.params(state))
    one = jax.tree.map(lambda p: p[0], state.variables['params'])
    leaves.append([len(v) for v in moe_model.leaf_paths(one).values()])
  growths = np.cumsum([t > 0 and t % grow_every == 0 for t in range(4)])
  assert params == [start + g * added for g in growths]
  assert leaves == [[2 + g, 2 + g] for g in growths]


def test_gmoe_splits_the_most_used_expert(config):
  learner, dataset = make_learner(config, 'gmoe')
  state = learner.init(jax.random.key(0))
  one = jax.tree.map(lambda p: p[0], state.variables)
  # Make expert 1 of layer 0 dominate its gate.
  one['params']['layer_0']['gate']['bias'] = jnp.array([-5.0, 5.0])
  r = first_round(dataset, config)
  usage = moe_learner.leaf_usage(learner, one, r.valid)
  assert usage['layer_0/1'] > usage['layer_0/0']
  assert sum(v for k, v in usage.items() if k.startswith('layer_0')) == pytest.approx(len(r.valid))
  grown = moe_learner.grow(learner, one, r.valid, jax.random.key(3))
  assert moe_model.leaf_paths(grown['params'])['layer_0'] == ['layer_0/0', 'layer_0/1/0',
                                                              'layer_0/1/1']


def test_boosting_trains_its_first_member_on_ordinary_epochs_as_finetune_does(config):
  """No bootstrap in the first round (crlapi/sl/clmodels/boosting.py:277-281), so the first
  member is the model finetune trains from the same start with the same keys."""
  trained = {}
  for name in ('boosting', 'finetune'):
    learner, dataset = make_learner(config, name)
    state, _ = learner.train_round(learner.init(jax.random.key(0)), first_round(dataset, config),
                                   jax.random.key(1))
    trained[name] = jax.tree.leaves(state.variables)
  for a, b in zip(trained['boosting'], trained['finetune']):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('name, model, patience, delta', [
    ('finetune', 'mlp', 25, 0.001), ('gens', 'mlp', 25, 0.001), ('boosting', 'mlp', 25, 0.001),
    ('k_ensemble', 'mlp', 100, 0.0), ('agg_ensemble', 'mlp', 100, 0.0),
    ('bagging', 'mlp', 100, 0.0), ('finetune', 'moe_mlp', 100, 0.001),
    ('gmoe', 'moe_mlp', 25, 0.001)])
def test_learners_train_with_the_reference_early_stopping_unless_the_config_says(
    name, model, patience, delta):
  config = alma_config.base()
  config.learner.name = name
  config.model.name = model
  resolved = learners.with_defaults(config)
  assert (resolved.train.patience, resolved.train.patience_delta) == (patience, delta)
  assert config.train.patience is None  # the config given is not modified
  config.train.patience = 7
  assert learners.with_defaults(config).train.patience == 7


@pytest.mark.parametrize('name, model', [('gmoe', 'mlp'), ('firefly', 'moe_mlp'),
                                         ('firefly', 'resnet18'), ('agg_ensemble', 'moe_vgg')])
def test_pairs_of_learner_and_model_that_cannot_work_are_refused_naming_both(config, name,
                                                                           model):
  config.learner.name, config.model.name = name, model
  with pytest.raises(ValueError, match=rf"learner\.name='{name}' with config\.model\.name="
                                       rf"'{model}'"):
    alma_config.validate(config)


def test_boosting_counts_the_forward_passes_that_weigh_examples_and_members(config):
  """Each round, SAMME runs every frozen member over the training data (example weights) and
  every member over the validation split (alphas): more FLOPs than the training steps alone."""
  learner, dataset = make_learner(config, 'boosting')
  r = first_round(dataset, config)
  state = learner.init(jax.random.key(0))
  forward, step = learner.flops()['forward'], learner.flops()['step']
  for frozen in (0, 1, 2):
    state, report = learner.train_round(state, r, jax.random.key(frozen + 1))
    assert report.train_flops == pytest.approx(
        report.steps * step + forward * (frozen * len(r.train) + (frozen + 1) * len(r.valid)))


def test_samme_weights_and_alphas():
  miss = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], np.float32)
  alphas, weights = boosting.samme(miss, num_classes=10)
  # Member 1 misses 1 of 4 equal weights: alpha log(3) + log(9) = log 27, and the missed
  # example's weight x27. Member 2 then misses 1 of 30: log(29) + log(9) = log 261.
  np.testing.assert_allclose(alphas, np.log([27, 261]), rtol=1e-6)
  np.testing.assert_allclose(weights, 4 * np.array([27, 261, 1, 1]) / 290, rtol=1e-5)


@pytest.mark.parametrize('combine', ['mean_logits', 'mean_probs', 'weighted_logits',
                                     'majority_vote'])
def test_padding_members_have_no_say(combine):
  from alma_jax.learners import members
  fn = getattr(members, combine)
  logits = jax.random.normal(jax.random.key(0), (3, 32, 10)) * 3
  weights = jnp.array([0.5, 1.0, 2.0])
  padded = jnp.concatenate([logits, jnp.repeat(logits[:1], 5, 0) * 7])
  padded_weights = jnp.concatenate([weights, jnp.zeros(5)])
  (lp, pred), (lp_pad, pred_pad) = fn(logits, weights), fn(padded, padded_weights)
  np.testing.assert_allclose(lp_pad, lp, atol=1e-5)
  np.testing.assert_array_equal(pred_pad, pred)


def test_majority_vote_breaks_ties_by_confidence():
  from alma_jax.learners import members
  # Members 0 and 1 vote class 0 and 1 (a tie); member 1 is the more confident.
  logits = jnp.array([[[1.0, 0.0, 0.0]], [[0.0, 5.0, 0.0]]])
  _, predicted = members.majority_vote(logits, jnp.ones(2))
  assert int(predicted[0]) == 1
  # Two of three members agree on class 2: the vote wins over a confident dissenter.
  logits = jnp.array([[[0.0, 0.0, 1.0]], [[0.0, 0.0, 1.0]], [[9.0, 0.0, 0.0]]])
  assert int(members.majority_vote(logits, jnp.ones(3))[1][0]) == 2
  # Classes 1 and 2 tie with two votes each; the most confident member voted class 0, so its
  # 0.1 breaks no tie, and the first tied class wins (the reference's k_ensemble.py:47-55).
  logits = jnp.array([[[0.0, 2.0, 0.0]], [[0.0, 2.0, 0.0]], [[0.0, 0.0, 3.0]],
                      [[0.0, 0.0, 3.0]], [[9.0, 0.0, 0.0]]])
  assert int(members.majority_vote(logits, jnp.ones(5))[1][0]) == 1


def test_a_round_schedule_spans_the_rounds_own_steps(config):
  config.optimizer.update(name='adamw', learning_rate=0.01, round_schedule=True,
                          warmup_fraction=0.1)
  config.train.update(max_epochs=3, patience=3)
  learner, dataset = make_learner(config, 'finetune', reset_optimizer=False)
  r = first_round(dataset, config)
  state, report = learner.train_round(learner.init(jax.random.key(0)), r, jax.random.key(1))
  (schedule,) = [s for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda x: isinstance(x, optim.RoundScheduleState))
                 if isinstance(s, optim.RoundScheduleState)]
  steps = 3 * math.ceil(len(r.train) / config.train.batch_size)
  # (the optimizer state kept is the best epoch's: its count may stop short)
  assert report.steps == int(schedule.steps[0]) == steps >= int(schedule.count[0]) > 0


def test_a_continued_optimizer_restarts_its_learning_rate_schedule_every_round(config):
  # The schedule decays to 0 within a round; continued unchanged, round 2 would not move.
  config.optimizer.update(name='adamw', learning_rate=0.01, warmup_steps=1, decay_steps=2)
  config.train.update(max_epochs=1, patience=1)  # the state kept is the round's last
  learner, dataset = make_learner(config, 'finetune', reset_optimizer=False)
  r = first_round(dataset, config)
  once, _ = learner.train_round(learner.init(jax.random.key(0)), r, jax.random.key(1))
  twice, _ = learner.train_round(once, r, jax.random.key(2))
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(once.variables),
                                                    jax.tree.leaves(twice.variables))]
  assert all(moved)
  counts = lambda state: [int(c[0]) for c in jax.tree.leaves(state.opt_state)
                          if np.asarray(c).dtype == np.int32]  # Adam's count, the schedule's
  adam_once, schedule_once = counts(once)
  adam_twice, schedule_twice = counts(twice)
  assert adam_twice == 2 * adam_once and schedule_twice == schedule_once  # only one restarted
