"""Growing models: mixtures of experts (MLP and VGG) and Firefly width growth."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alma_jax import config as alma_config, data as alma_data, learners, metrics, run, sharding
from alma_jax.learners import firefly as firefly_learner, moe as moe_learner
from alma_jax.models import MLP, VGG, firefly, moe
from alma_jax.placement import device_data
from test_conv import CONV_BLOCKS, conv_config
from test_learners import first_round

# (a VGG with two convolutions in its first block: growth within a block and across a halving)
MODELS = {'mlp': (MLP(hidden=8), (16, 12, 12)),
          'vgg': (VGG(width=4, blocks=(2, 1, 1, 1, 1)), (16, 32, 32, 1))}


def outputs(model, variables, x, train):
  """Logits in evaluation mode, or in training mode (BatchNorm on batch statistics)."""
  if train and 'batch_stats' in variables:
    return model.apply(variables, x, train=True, mutable=['batch_stats'])[0]
  return model.apply(variables, x, train=train)


@pytest.mark.parametrize('name', MODELS)
@pytest.mark.parametrize('path', ['layer_0/0', 'layer_0/1', 'layer_1/1'])
def test_splitting_an_expert_preserves_the_function_under_any_gate(name, path):
  base, shape = MODELS[name]
  model = moe.mixture_of(base, 2)
  x = jax.random.normal(jax.random.key(1), shape)
  variables = model.init(jax.random.key(0), x)
  before = {train: outputs(model, variables, x, train) for train in (False, True)}
  grown = variables
  for i in range(3):  # split, then split a child of the new node, under random fresh gates
    grown = moe.split_leaf(grown, path + '/0' * i, jax.random.key(10 + i))
    for train in (False, True):
      np.testing.assert_allclose(outputs(model, grown, x, train), before[train], atol=1e-5)
  assert len(moe.leaf_paths(grown['params'])[path.split('/')[0]]) == 5
  assert len(moe.leaf_paths(variables['params'])['layer_0']) == 2  # the input was not modified


def test_moe_vgg_shares_block_0_and_gates_on_a_4x4_view():
  width = 4
  model = moe.mixture_of(VGG(width=width), 2)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  params = variables['params']
  assert sorted(params) == ['head', 'layer_0', 'layer_1', 'layer_2', 'layer_3', 'stem']
  for layer in ('layer_0', 'layer_1', 'layer_2', 'layer_3'):
    assert params[layer]['gate']['kernel'].shape == (16 * width, 2)
  # stem = VGG block 0; each mixture layer = 2 copies of its VGG block + a gate; same head.
  vgg = VGG(width=width).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  block = lambda b: metrics.num_params(vgg[f'ConvBlock_{b}'])
  gates = 4 * (16 * width * 2 + 2)
  assert metrics.num_params(params) == (block(0) + 2 * sum(block(b) for b in range(1, 5))
                                        + gates + metrics.num_params(vgg['Linear_0']))
  # BatchNorm statistics of every expert, under the expert's path
  assert 'Conv_0' not in variables['batch_stats']['layer_2']['children']['1']
  assert 'BatchNorm_3' in variables['batch_stats']['layer_2']['children']['1']


@pytest.mark.parametrize('name', MODELS)
def test_moe_vgg_experts_start_as_copies_moe_mlp_experts_do_not(name):
  """The reference deep-copies one block into every MoE-VGG expert
  (crlapi/sl/architectures/vgg.py:125) and builds each MoE-MLP expert afresh (mlp.py:70)."""
  base, shape = MODELS[name]
  variables = moe.mixture_of(base, 3).init(jax.random.key(0), jnp.zeros(shape))
  for layer in ('layer_0', 'layer_1'):
    children = variables['params'][layer]['children']
    same = [all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(children['0']),
                                                     jax.tree.leaves(children[k])))
            for k in ('1', '2')]
    assert same == [name == 'vgg'] * 2


def test_pooled_4x4_matches_adaptive_average_pooling():
  x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  pooled = moe.pooled_4x4(x).reshape(2, 4, 4, 3)
  np.testing.assert_allclose(pooled[:, 1, 2], x[:, 2:4, 4:6].mean(axis=(1, 2)))
  small = jnp.arange(2 * 2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 2, 3)
  repeated = moe.pooled_4x4(small).reshape(2, 4, 4, 3)
  np.testing.assert_allclose(repeated[:, 3, 1], small[:, 1, 0])


def test_gmoe_vgg_grows_one_expert_per_block(config):
  config = conv_config(config)
  config.learner.name, config.model.name = 'gmoe', 'moe_vgg'
  dataset = alma_data.load(config.data)
  mesh = sharding.make_mesh()
  learner = learners.create(config, dataset, device_data(dataset, mesh), mesh)
  state = learner.init(jax.random.key(0))
  one = jax.tree.map(lambda a: a[0], state.variables)
  grown = moe_learner.grow(learner, one, first_round(dataset, config).valid, jax.random.key(1))
  vgg = VGG(width=4, blocks=CONV_BLOCKS).init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))[
      'params']
  added = sum(metrics.num_params(vgg[f'ConvBlock_{b}']) for b in range(1, 5)) + 4 * (64 * 2 + 2)
  assert metrics.num_params(grown['params']) == metrics.num_params(one['params']) + added
  assert [len(v) for v in moe.leaf_paths(grown['params']).values()] == [3, 3, 3, 3]
  for paths in moe.leaf_paths(grown['params']).values():  # every expert has its statistics
    for path in paths:
      assert 'BatchNorm_0' in moe._get(grown['batch_stats'], path)


@pytest.mark.parametrize('name', MODELS)
def test_firefly_growth_without_perturbation_preserves_the_function(name):
  model, shape = MODELS[name]
  x = jax.random.normal(jax.random.key(1), shape)
  variables = model.init(jax.random.key(0), x)
  layers = model.neuron_layers()
  cands = firefly.candidates(jax.random.key(2), variables, layers, new_neurons=5)
  unperturbed = [{**c, 'split': 0 * c['split'], 'new_out': 0 * c['new_out']} for c in cands]
  split = [np.array([0, 2])] * len(cands)
  new = [np.array([1, 3, 4])] * len(cands)
  grown = firefly.grow(variables, layers, unperturbed, split, new)
  assert firefly.neurons(grown, layers) == firefly.neurons(variables, layers) + 5 * len(cands)
  for train in (False, True):
    np.testing.assert_allclose(outputs(model, grown, x, train),
                               outputs(model, variables, x, train), atol=1e-4)
  # With the perturbations, the grown network computes something else.
  perturbed = firefly.grow(variables, layers, cands, split, new)
  assert not np.allclose(outputs(model, perturbed, x, False), outputs(model, variables, x, False),
                         atol=1e-4)


def test_firefly_split_copies_weights_and_halves_outgoing_ones():
  model, shape = MODELS['mlp']
  variables = model.init(jax.random.key(0), jnp.zeros(shape))
  layers = model.neuron_layers()
  cands = firefly.candidates(jax.random.key(2), variables, layers, new_neurons=3)
  grown = firefly.grow(variables, layers, cands, [np.array([5]), np.array([])],
                       [np.array([]), np.array([2])])
  p, g = variables['params'], grown['params']
  delta = cands[0]['split'][:, 5]
  np.testing.assert_allclose(g['Linear_0']['kernel'][:, 5], p['Linear_0']['kernel'][:, 5] + delta)
  np.testing.assert_allclose(g['Linear_0']['kernel'][:, 8], p['Linear_0']['kernel'][:, 5] - delta)
  np.testing.assert_allclose(g['Linear_1']['kernel'][5, :8], p['Linear_1']['kernel'][5] / 2)
  np.testing.assert_allclose(g['Linear_1']['kernel'][8, :8], p['Linear_1']['kernel'][5] / 2)
  # layer 1 gained its new candidate 2: input weights from the original inputs only (the split
  # copy's input weight is 0), outgoing weights into the head
  np.testing.assert_allclose(g['Linear_1']['kernel'][:8, 8], cands[1]['new_in'][:, 2])
  assert g['Linear_1']['kernel'][8, 8] == 0
  np.testing.assert_allclose(g['Linear_2']['kernel'][8], cands[1]['new_out'][2])
  assert g['Linear_1']['kernel'].shape == (9, 9) and g['Linear_1']['bias'][8] == 0


# Neurons of an MLP with two hidden layers of 64 after each round, growth_rate 0.6, T=10, as the
# reference's Firefly grows it (crlapi/sl/clmodels/firefly.py:76-82, 241-246: after t rounds
# trained, n += int(n * ((0.6 t + 1) / (0.6 (t - 1) + 1) - 1)), for t = g, 2g, ...).
REFERENCE_WIDTHS = {
    1: [128, 204, 280, 356, 432, 508, 584, 660, 736, 812],
    2: [128, 128, 176, 176, 213, 213, 244, 244, 272, 272],
    5: [128, 128, 128, 128, 128, 150, 150, 150, 150, 150],
}


@pytest.mark.parametrize('grow_every', sorted(REFERENCE_WIDTHS))
def test_firefly_grows_the_current_width_by_the_reference_ratio(grow_every):
  widths = [128]
  for t in range(1, 10):
    grows = t % grow_every == 0
    widths.append(widths[-1] + (firefly_learner.neurons_to_add(widths[-1], t, 0.6) if grows
                                else 0))
  assert widths == REFERENCE_WIDTHS[grow_every]


@pytest.mark.parametrize('grow_every', [1, 2])
def test_firefly_learner_grows_by_the_reference_rule(config, grow_every):
  config.learner.update(name='firefly', new_neurons=8, grow_every=grow_every)
  dataset = alma_data.load(config.data)
  mesh = sharding.make_mesh()
  learner = learners.create(config, dataset, device_data(dataset, mesh), mesh)
  layers = learner.model.neuron_layers()
  state = learner.init(jax.random.key(0))
  start = firefly.neurons(state.variables, layers)
  r = first_round(dataset, config)
  counts, flops = [], []
  for t in range(3):
    state, report = learner.train_round(state, r, jax.random.key(t))
    counts.append(firefly.neurons(state.variables, layers))
    flops.append(report.train_flops)
  grown = lambda n, t: n + int(n * ((0.6 * t + 1) / (0.6 * (t - 1) + 1) - 1))
  expected = ([start, grown(start, 1), grown(grown(start, 1), 2)] if grow_every == 1 else
              [start, start, grown(start, 2)])
  assert counts == expected
  assert flops[grow_every] > flops[0]  # choosing the candidates is counted


def test_firefly_candidates_are_optimized_unclipped(config):
  """The reference defines a clip of the new neurons' outgoing weights to +-0.01
  (sp/conv.py:193-195) but never calls it: they start within it and may leave it."""
  config.learner.update(name='firefly', new_neurons=4)
  dataset = alma_data.load(config.data)
  mesh = sharding.make_mesh()
  learner = learners.create(config, dataset, device_data(dataset, mesh), mesh)
  one = jax.tree.map(lambda a: a[0], learner.init(jax.random.key(0)).variables)
  layers = learner.model.neuron_layers()
  cands = firefly.candidates(jax.random.key(2), one, tuple(layers), 4)
  assert max(float(jnp.max(jnp.abs(c['new_out']))) for c in cands) <= 0.01
  optimized, _, _ = firefly_learner.score(learner, one, layers, cands,
                                          first_round(dataset, config).train, jax.random.key(3))
  assert max(float(jnp.max(jnp.abs(c['new_out']))) for c in optimized) > 0.01


def test_firefly_grows_the_best_scoring_candidates(config, monkeypatch):
  config.learner.update(name='firefly', new_neurons=4)
  dataset = alma_data.load(config.data)
  mesh = sharding.make_mesh()
  learner = learners.create(config, dataset, device_data(dataset, mesh), mesh)
  one = jax.tree.map(lambda a: a[0], learner.init(jax.random.key(0)).variables)
  h = config.model.hidden

  scored = []

  def fake_score(learner, variables, layers, cands, indices, key):
    split = [np.ones(h), np.ones(h)]
    new = [np.ones(4), np.ones(4)]
    split[1][[3, 7]] = -1.0  # layer 1's neurons 3 and 7 lower the loss most
    new[0][1] = -2.0         # and new neuron 1 of layer 0
    scored.append(cands)
    return cands, (split, new), 0.0

  monkeypatch.setattr(firefly_learner, 'score', fake_score)
  config.learner.growth_rate = 3 / (2 * h)  # grow 3 of the 2h neurons
  grown, _ = firefly_learner.grow(learner, one, np.arange(100), 1, jax.random.key(1),
                                  config.learner)
  before, after = one['params'], grown['params']
  assert after['Linear_0']['kernel'].shape[-1] == h + 1
  assert after['Linear_1']['kernel'].shape[-1] == h + 2
  # The chosen ones, not any three: layer 0 gained new neuron 1 (its input weights), layer 1
  # split neurons 3 and 7 (their outgoing weights into the head halved, the others kept).
  np.testing.assert_allclose(after['Linear_0']['kernel'][:, h], scored[0][0]['new_in'][:, 1])
  head = np.asarray(before['Linear_2']['kernel'])
  halved = np.ones(h)
  halved[[3, 7]] = 0.5
  np.testing.assert_allclose(after['Linear_2']['kernel'][:h], head * halved[:, None], rtol=1e-6)
  np.testing.assert_allclose(after['Linear_2']['kernel'][h:], head[[3, 7]] / 2, rtol=1e-6)


def test_firefly_over_a_vgg_whose_head_reads_a_larger_map_is_refused_before_training(config,
                                                                                      tmp_path):
  """(12x12 images through two halvings leave a 3x3 map: the head reads 9 values a channel, so
  no neuron of the last convolution can be split; this failed at the first growth, after
  training)"""
  config = conv_config(config)
  config.model.blocks = (1, 1)
  config.data.pad_to = 0
  alma_config.growing('firefly')(config)
  with pytest.raises(ValueError, match=r"learner\.name='firefly': layer .* reads 36 inputs, not "
                                       r"the 4 outputs of ConvBlock_1/Conv_0"):
    run.run(config, str(tmp_path))
  assert not (tmp_path / run.METRICS_FILE).exists()


def test_firefly_vgg_run_grows_in_the_metrics(config, tmp_path):
  config = conv_config(config)
  config.model.blocks = (1, 1, 1)  # 3 convolutions, so that few grown programs compile
  config.data.pad_to = 0  # (12x12 images: enough for 3 halvings)
  alma_config.growing('firefly')(config)
  config.learner.update(grow_every=1, new_neurons=4)
  config.stream.num_megabatches = 2
  config.data.max_train_examples = 320
  config.train.max_epochs = 1
  summary = run.run(config, str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / run.METRICS_FILE)]
  assert rows[0]['params'] < rows[1]['params'] == summary['params']  # grown before round 2
