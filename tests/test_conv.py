"""The convolutional path: VGG, ResNet-18, BatchNorm state, augmentation, CIFAR-10 data."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alma_jax import config as alma_config, data, learners, metrics, run, sharding, steps
from alma_jax.data import random_crop_flip
from alma_jax.models import VGG, Aggregate, ResNet18
from alma_jax.placement import device_data
from conftest import REPO


# One convolution a block: a VGG's structure (BatchNorm, five halvings, a head) with a third of
# VGG-19's convolutions to compile.
CONV_BLOCKS = (1, 1, 1, 1, 1)


@pytest.mark.parametrize('width', [4, 8, 16, 32])
def test_vgg_parameters_match_the_reference(width):
  variables = VGG(width=width).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert metrics.num_params(variables['params']) == 135 * width ** 2 + 85 * width + 10
  assert set(variables) == {'params', 'batch_stats'}


def test_resnet18_has_the_usual_parameter_count():
  variables = ResNet18(width=64).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert metrics.num_params(variables['params']) == 11_173_962  # ResNet-18, CIFAR stem


def test_resnet18_trains_in_a_tiny_run(config, tmp_path):
  config = conv_config(config)
  config.model = alma_config.base().model
  config.model.name = 'resnet18'
  del config.model['hidden'], config.model['num_layers']
  config.model.width = 4
  config.stream.num_megabatches = 2
  # (Random crops of the synthetic 12x12 patterns padded to 32 leave too little to learn in a
  # few epochs: with them it stays at chance.)
  config.data.augmentation = ''
  config.optimizer.learning_rate = 0.1
  config.train.update(max_epochs=5, patience=5)
  summary = run.run(config, str(tmp_path))
  assert summary['rounds'] == 2 and summary['final_error'] < 0.75  # chance: 0.9
  assert summary['final_test_loss'] < np.log(10) - 0.2  # a uniform guess: log(10)
  assert summary['params'] == metrics.num_params(
      ResNet18(width=4).init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))['params'])


def test_evaluation_uses_running_statistics():
  model = VGG(width=4, blocks=CONV_BLOCKS)
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 1))
  variables = model.init(jax.random.key(0), x)
  alone = model.apply(variables, x[:1], train=False)
  together = model.apply(variables, x, train=False)[:1]
  np.testing.assert_allclose(alone, together, atol=1e-5)  # no batch statistics in evaluation
  _, updated = model.apply(variables, x, train=True, mutable=['batch_stats'])
  before, after = jax.tree.leaves(variables['batch_stats']), jax.tree.leaves(updated)
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_random_crop_flip_takes_shifted_and_mirrored_crops():
  images = np.arange(2 * 8 * 8).reshape(2, 8, 8, 1).astype(np.uint8) + 1
  out = np.asarray(random_crop_flip(jnp.asarray(images), jax.random.key(3)))
  assert out.shape == images.shape and out.dtype == np.uint8
  padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for i in range(2):
    candidates = [padded[i, y:y + 8, x:x + 8] for y in range(9) for x in range(9)]
    candidates += [c[:, ::-1] for c in candidates]
    assert any(np.array_equal(out[i], c) for c in candidates)
  again = np.asarray(random_crop_flip(jnp.asarray(images), jax.random.key(3)))
  other = np.asarray(random_crop_flip(jnp.asarray(images), jax.random.key(4)))
  assert np.array_equal(out, again) and not np.array_equal(out, other)


def conv_config(config):
  config.data.update(pad_to=32, augmentation='crop_flip')
  config.model = alma_config.base().model
  config.model.name = 'vgg'
  del config.model['hidden'], config.model['num_layers']
  config.model.update(width=4, blocks=CONV_BLOCKS)
  config.optimizer.update(name='sgd', learning_rate=0.01, momentum=0.9, weight_decay=1e-4)
  config.stream.num_megabatches = 3
  config.train.update(max_epochs=2, patience=2)
  return config


def test_conv_run_checkpoints_batchnorm_statistics_and_resumes_exactly(config, tmp_path):
  config = conv_config(config)
  run.run(config, str(tmp_path / 'straight'))
  shutil.copytree(tmp_path / 'straight', tmp_path / 'stopped')
  shutil.rmtree(tmp_path / 'stopped' / 'checkpoints' / '3')
  for name in (run.METRICS_FILE, run.SUMMARY_FILE):  # the rows must come from the resumed run
    os.remove(tmp_path / 'stopped' / name)
  kept = os.path.getmtime(tmp_path / 'stopped' / 'checkpoints' / '2')
  run.run(config, str(tmp_path / 'stopped'))
  assert os.path.getmtime(tmp_path / 'stopped' / 'checkpoints' / '2') == kept
  read = lambda d: [json.loads(l)['test_error'] for l in open(d / run.METRICS_FILE)]
  assert read(tmp_path / 'stopped') == read(tmp_path / 'straight')
  from alma_jax.checkpoint import Checkpointer
  tree = Checkpointer(str(tmp_path / 'straight' / 'checkpoints')).restore(3)
  stats = tree['learner']['variables']['batch_stats']
  assert jax.tree.leaves(stats) and not np.allclose(jax.tree.leaves(stats)[0], 0.0)


def test_epochs_compile_whole_except_convolutions_on_cpu(config):
  dataset = data.load(config.data)
  mesh = sharding.make_mesh()
  mlp = learners.create(config, dataset, device_data(dataset, mesh), mesh)
  conv = conv_config(config)
  dataset = data.load(conv.data)
  vgg = learners.create(conv, dataset, device_data(dataset, mesh), mesh)
  assert mlp.trainer.compiled_epoch and not vgg.trainer.compiled_epoch


def test_host_driven_and_compiled_epochs_train_alike(config):
  dataset = data.load(config.data)
  mesh = sharding.make_mesh()
  results = []
  for setting in ('yes', 'no'):
    config.train.compiled_epoch = setting
    learner = learners.create(config, dataset, device_data(dataset, mesh), mesh)
    variables = learner.new_members(jax.random.key(0), 2)
    opt_state = learner.init_optimizer(variables)
    idx, n = steps.pad_indices(np.tile(np.arange(700), (2, 1)), 128)
    weights = (np.arange(idx.shape[1]) < n).astype(np.float32)[None].repeat(2, 0)
    keys = jax.random.split(jax.random.key(1), 2)
    results.append(learner.trainer.train_epoch(variables, opt_state, learner.data.train_images,
                                               learner.data.train_labels, idx, weights, n,
                                               keys, 3)[0])
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_microbatches_of_padding_alone_leave_batchnorm_and_the_update_alone(config):
  """An epoch of 140 examples in batches of 128 cut in 2 microbatches: the last batch's second
  microbatch is all padding. Its BatchNorm statistics over no example were NaN, and made the
  whole member NaN."""
  config = conv_config(config)
  config.train.update(batch_size=128, microbatches=2)
  dataset = data.load(config.data)
  mesh = sharding.make_mesh()
  learner = learners.create(config, dataset, device_data(dataset, mesh), mesh)
  variables = learner.new_members(jax.random.key(0), 1)
  idx, n = steps.pad_indices(np.arange(140)[None], 128)
  weights = (np.arange(idx.shape[1]) < n).astype(np.float32)[None]
  trained, _ = learner.trainer.train_epoch(
      variables, learner.init_optimizer(variables), learner.data.train_images,
      learner.data.train_labels, idx, weights, n, jax.random.split(jax.random.key(1), 1), 0)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(trained))
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained),
                                                      jax.tree.leaves(variables)))


def test_cifar10_config_reads_tfds_cifar10():
  import tensorflow_datasets as tfds
  c = alma_config.load(os.path.join(REPO, 'configs', 'cifar10.py:tiny'))
  with tfds.testing.mock_data(num_examples=16):
    dataset = data.load(c.data)
  assert dataset.train_images.shape == (16, 32, 32, 3) and dataset.augmentation == 'crop_flip'
  assert len(dataset.mean) == 3


@pytest.mark.parametrize('model', [VGG(width=4, blocks=CONV_BLOCKS),
                                   Aggregate(VGG(width=4, blocks=CONV_BLOCKS), 2)],
                         ids=['vgg', 'agg_ensemble_of_vggs'])
def test_batchnorm_statistics_ignore_padding_examples(model):
  """(Flax's vmap drops keyword arguments: the agg-ensemble's members once never saw the
  mask, and counted the padding copies in their statistics.)"""
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 1))
  variables = model.init(jax.random.key(0), x)
  mask = (jnp.arange(8) < 5).reshape(8, 1, 1, 1)
  _, masked = model.apply(variables, x, train=True, mutable=['batch_stats'], mask=mask)
  _, alone = model.apply(variables, x[:5], train=True, mutable=['batch_stats'])
  for a, b in zip(jax.tree.leaves(masked), jax.tree.leaves(alone)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
