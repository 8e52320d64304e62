"""Config defaults shared by every config file, and the checks a config must pass before any work.

A config has sections: data, stream, model, learner, optimizer, train, mesh, checkpoint, log,
backend, and the top-level `seed` and `extensions`. Config files under configs/ start from
`base()` and set what differs.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os

import ml_collections

# Sections and keys that may change when a run is resumed: they do not change what the run
# computes.
RESUMABLE = ('checkpoint', 'mesh', 'log', 'backend', 'data.placement', 'data.device_memory',
             'data.prefetch', 'data.feed_steps', 'data.cache_dir')


def base() -> ml_collections.ConfigDict:
  """The ALMA protocol with the reference's MNIST defaults (facebookresearch/alma)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # model initialization and shuffling; the stream has its own seed
  # Modules imported before the config is checked, by every process that runs or reads back
  # the run: where a user's own learners, models or data sources register (docs/extending.md).
  c.extensions = ()

  c.data = ml_collections.ConfigDict(dict(
      task='classification',  # or 'language_model' (byte sequences, next-byte targets)
      source='idx', name='', path='', tfds_data_dir='', num_classes=10,
      mean=(0.1307,), std=(0.3081,), max_train_examples=0, max_test_examples=0,
      subset='first',    # which max_*_examples: the 'first', or 'spread' evenly over all
      pad_to=0,          # zero-pad images to pad_to x pad_to (0: as they are)
      augmentation='',   # '' or 'crop_flip' (random crop with padding 4, horizontal flip)
      sequence_length=128,  # language models: tokens per example (the model's context)
      tokenizer='',         # language models: '' (bytes) or a SentencePiece model file
      test_fraction=0.1,    # language models over text files: documents held out for the test
      cache_dir='',         # decoded data: tokenized corpora, gunzipped idx files ('':
                            # ~/.cache/alma_jax/corpora, ~/.cache/alma_jax/idx)
      # Where the run reads the data (alma_jax/placement.py): 'device' (replicated on every
      # device), 'host' (streamed from host memory), or 'auto': 'device' when the arrays fit
      # in device_memory bytes of a device (0: half of the device's memory).
      placement='auto', device_memory=0,
      feed_steps=8,         # 'host': steps whose batches one compiled call takes together
      prefetch=4))          # 'host': such feeds gathered ahead by background threads (0: none)

  c.stream = ml_collections.ConfigDict(dict(
      num_megabatches=10,        # T
      permutation_seed=432,      # the reference's numpy seed for the one permutation
      waiting_time=1,            # w: train after arrivals w, 2w, 3w, ...
      train_on_last=False,       # also train after arrival T when T is not a multiple of w
      replay='none',             # none | all | fraction | reservoir
      replay_fraction=0.5,       # p, for replay='fraction' (of the training examples)
      # ... of the validation examples (None: replay_fraction), as the reference's separate
      # train_ and validation_replay_proportion
      validation_replay_fraction=ml_collections.FieldReference(None, field_type=float),
      reservoir_size=10000,      # K, for replay='reservoir'
      validation_fraction=0.1))  # held out of every round's data for early stopping

  c.model = ml_collections.ConfigDict(dict(name='mlp', hidden=64, num_layers=2))
  c.learner = ml_collections.ConfigDict(dict(
      name='finetune',
      reset_optimizer=True,      # a fresh optimizer every round, as the reference
      num_members=3,             # k: k-ensemble and agg-ensemble members; bagging's per round
      new_member='copy',         # gEns / boosting: a new member starts as a copy of the last, or 'fresh'
      prediction='mean_logits',  # gEns, k-ensemble: 'vote', a majority vote; else gEns averages
                                 # logits, k-ensemble probabilities (as the reference)
      grow_every=1,              # gMoE, Firefly: grow after every g rounds trained
      growth='usage',            # gMoE: split the most used leaf expert, or a 'random' one
      growth_rate=0.6,           # Firefly: r; grow by (1 + r t) / (1 + r (t - 1)), t rounds trained
      new_neurons=70))           # Firefly: brand-new neuron candidates per layer (reference: 70)
  c.optimizer = ml_collections.ConfigDict(dict(
      name='adadelta', learning_rate=1.0, momentum=0.9, weight_decay=0.0, nesterov=False,
      warmup_steps=0,   # linear warm-up from 0 over the first steps of every round
      decay_steps=0,    # then cosine decay to 0 over this many steps (0: constant)
      # Or, measured in rounds: a warm-up over this fraction of each round's steps, then a
      # cosine decay to 0 at its last possible step (train.max_epochs epochs of the round).
      round_schedule=False, warmup_fraction=0.0))
  # patience and patience_delta: None takes the learner's own default (the reference's setting
  # for that learner; see learners.TRAIN_DEFAULTS); a value given here or on the command line wins.
  c.train = ml_collections.ConfigDict(dict(
      batch_size=128, max_epochs=100, eval_batch_size=1000,
      patience=ml_collections.FieldReference(None, field_type=int),
      patience_delta=ml_collections.FieldReference(None, field_type=float),
      stop_on='accuracy',      # early stopping on validation 'accuracy' or 'loss'
      microbatches=1,          # gradient accumulation: a batch's update from this many slices
      compiled_epoch='auto'))  # 'yes': an epoch is one compiled loop; 'no': a step per call
  # Devices splitting each batch (0: all that `member` leaves) x devices holding different members.
  # shard_params: FSDP, each member's parameters and optimizer state split over `data` too.
  c.mesh = ml_collections.ConfigDict(dict(data=0, member=1, shard_params=False))
  # Checkpoints kept: 0 keeps one per arrival (what analysis reads back); else the newest n.
  c.checkpoint = ml_collections.ConfigDict(dict(max_to_keep=0))
  # Console: a progress bar while a round trains ('auto': when stderr is a terminal; 'on',
  # 'off'); a line per epoch with the validation score (epochs=True).
  c.log = ml_collections.ConfigDict(dict(tensorboard=True, epochs=False, progress='auto'))
  # Deterministic GPU kernels (identical reruns and resumes), and where compiled programs are
  # kept between runs ('' for nowhere). See alma_jax/backend.py.
  c.backend = ml_collections.ConfigDict(dict(deterministic=True,
                                             compilation_cache='~/.cache/alma_jax/jax'))
  return c


# The repository (a source checkout or an editable install), whose configs/ a relative config
# path may name from any directory.
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resolve(path: str) -> str:
  """`path` as given if it names a file, else relative to the repository (so
  `configs/lm.py` works from any directory); unchanged if neither exists."""
  if os.path.isfile(path) or os.path.isabs(path):
    return path
  in_repository = os.path.join(REPOSITORY, path)
  return in_repository if os.path.isfile(in_repository) else path


def load(spec: str) -> ml_collections.ConfigDict:
  """The config that `--config=path[:variant]` gives main, for scripts and tests."""
  path, _, variant = spec.partition(':')
  path = resolve(path)
  source = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0] + '_config', path)
  if source is None or not path.endswith('.py'):
    raise ValueError(f'{path} is not a config file (a Python file whose get_config(variant) '
                     f'returns the config; a run\'s config.json is resumed with the command that '
                     f'started it)')
  module = importlib.util.module_from_spec(source)
  source.loader.exec_module(module)
  if not callable(getattr(module, 'get_config', None)):
    raise ValueError(f'{path} defines no get_config(variant)')
  config = module.get_config(variant)
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(f'{path}: get_config returned a {type(config).__name__}, not an '
                     f'ml_collections.ConfigDict (start from alma_jax.config.base())')
  return config


# The sections that every version's config.json holds: what tells a run's config from another
# file of that name.
SAVED_SECTIONS = ('data', 'stream', 'model', 'learner', 'train')


def is_saved_config(saved) -> bool:
  """Whether `saved`, a config.json's content, is an alma_jax run's config."""
  return isinstance(saved, dict) and all(isinstance(saved.get(s), dict) for s in SAVED_SECTIONS)


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A run's saved config.json as a config, keys added since the run was written at their
  defaults (which keep the behaviour of that time): the sections' defaults, and the model's
  own for model keys its config left out."""
  from alma_jax import models
  saved = _with_mixture_models(saved)
  c = base()
  for section, values in saved.items():
    if section == 'model' or not isinstance(values, dict):
      c[section] = values if not isinstance(values, dict) else ml_collections.ConfigDict(values)
    else:
      c[section].update(values)
  for key, value in models.defaults(c.model.get('name', '')).items():
    if key not in c.model:
      c.model[key] = value
  return c


def _with_mixture_models(saved: dict) -> dict:
  """A config saved before mixtures of experts were models (0.4.0 and earlier: learners 'moe'
  and 'gmoe' over model 'mlp' or 'vgg', `learner.num_experts`) in today's terms."""
  learner, model = saved.get('learner', {}), saved.get('model', {})
  if 'num_experts' not in learner:
    return saved
  learner = dict(learner)
  experts = learner.pop('num_experts')
  if learner.get('name') in ('moe', 'gmoe'):
    model = {**model, 'name': f'moe_{model.get("name", "mlp")}', 'num_experts': experts}
    if learner['name'] == 'moe':
      learner['name'] = 'finetune'
  return {**saved, 'learner': learner, 'model': model}


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a seconds-long smoke run (the `:tiny` variant of every config file)."""
  c.data.update(max_train_examples=2000, max_test_examples=1000)
  c.stream.num_megabatches = 4
  c.train.update(max_epochs=3, patience=2)
  return c


def tiny_vgg(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`tiny` for a VGG config: seconds on a CPU and still learning (one convolution per VGG
  block, width 8, a larger SGD step)."""
  tiny(c)
  c.model.update(width=8, blocks=(1, 1, 1, 1, 1))
  c.optimizer.learning_rate = 0.05
  return c


def growing(learner: str):
  """A variant that switches to a growing learner or a mixture of experts with the reference's
  CIFAR-10 settings for it (Nesterov momentum; growth every 2 of 10 mega-batches): 'moe'
  (finetune over the mixture version of the model), 'gmoe' (growing that mixture), 'firefly'."""
  def variant(c: ml_collections.ConfigDict) -> None:
    if learner in ('moe', 'gmoe') and not c.model.name.startswith('moe_'):
      c.model.name = f'moe_{c.model.name}'
    c.learner.name = 'finetune' if learner == 'moe' else learner
    c.learner.grow_every = base().learner.grow_every if learner == 'moe' else 2
    c.optimizer.nesterov = True
  return variant


def apply_variants(c: ml_collections.ConfigDict, variant: str, path: str,
                   known: dict | None = None) -> ml_collections.ConfigDict:
  """Applies the comma-separated variants of config file `path` in order: `tiny` and the
  `known` ones (name -> function that updates the config)."""
  known = {'tiny': tiny, **(known or {})}
  for name in filter(None, variant.split(',')):
    if name not in known:
      raise ValueError(f'unknown variant {name!r} of {path} (known: {", ".join(known)})')
    known[name](c)
  return c


def fail(key: str, value, why: str):
  """Raises the error of a bad config value: `config.<key>=<value>: <why>`."""
  raise ValueError(f'config.{key}={value!r}: {why}')


def _finite(c: ml_collections.ConfigDict, prefix: str = '') -> None:
  for key, value in c.items():
    if isinstance(value, ml_collections.ConfigDict):
      _finite(value, f'{prefix}{key}.')
    elif isinstance(value, (tuple, list)) and any(isinstance(v, float) and not math.isfinite(v)
                                                  for v in value):
      fail(prefix + key, value, 'must hold finite numbers')
    elif isinstance(value, float) and not math.isfinite(value):
      fail(prefix + key, value, 'must be a finite number')


def import_extensions(c: ml_collections.ConfigDict) -> None:
  """Imports the modules `c.extensions` names (their registrations take effect)."""
  for name in c.get('extensions', ()):
    try:
      importlib.import_module(name)
    except ImportError as error:
      raise ValueError(f'config.extensions: cannot import {name!r} ({error}); put its folder on '
                       f'PYTHONPATH or install it') from None


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad key; called before any data or compute. Each
  module checks its own section; the rules that tie sections together are here. Keys left to
  the learner's defaults (None) are checked at those defaults."""
  from alma_jax import data, learners, models, optim, stream
  from alma_jax.learners import base
  c = learners.with_defaults(c)  # imports the config's extensions first
  _finite(c)
  if not 0 <= c.seed < 2 ** 32:  # (a key's seed, and with the arrival a replay draw's)
    fail('seed', c.seed, 'must be in [0, 2**32)')
  data.check(c.data)
  stream.check(c.stream)
  language_model = c.data.task == 'language_model'
  if (c.model.name == 'transformer') != language_model:
    fail('model.name', c.model.name, "the 'transformer' model and data.task='language_model' "
         "go together")
  learners.check(c.learner)
  learners.check_model(c.learner.name, c.model.name)
  models.check(c.model)
  optim.check(c.optimizer)
  base.check_train(c.train)
  if language_model and c.learner.prediction == 'vote':
    fail('learner.prediction', c.learner.prediction, 'a language model averages probabilities')
  context = c.model.get('context', models.defaults(c.model.name).get('context'))
  if language_model and c.data.sequence_length > context:
    fail('data.sequence_length', c.data.sequence_length,
         f'longer than the transformer\'s positions (model.context={context})')
  if c.mesh.data < 0:
    fail('mesh.data', c.mesh.data, 'must be >= 0 (0: every device)')
  if c.mesh.member < 1:
    fail('mesh.member', c.mesh.member, 'must be >= 1')
  if c.checkpoint.max_to_keep < 0 or c.checkpoint.max_to_keep == 1:
    fail('checkpoint.max_to_keep', c.checkpoint.max_to_keep,
         'keep 0 (all) or at least 2, so a corrupt latest checkpoint can fall back to the one '
         'before')
  if c.log.progress not in ('auto', 'on', 'off'):
    fail('log.progress', c.log.progress, "must be 'auto', 'on' or 'off'")


def protocol_differences(saved: dict, current: dict) -> list[str]:
  """Keys (dotted) whose values differ between two configs, outside RESUMABLE, both
  completed with today's defaults (a key added since a run was written, at its default, is no
  difference; nor is NaN saved and NaN given)."""

  def flatten(d, prefix=''):
    out = {}
    for k, v in d.items():
      if isinstance(v, dict):
        out.update(flatten(v, f'{prefix}{k}.'))
      else:
        out[f'{prefix}{k}'] = list(v) if isinstance(v, tuple) else v
    return out

  def same(a, b):
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)

  from alma_jax import learners
  complete = lambda d: flatten(from_saved(d).to_dict())
  a, b = complete(saved), complete(current)
  # The optimizer's reset changes nothing for a learner that trains new members every round
  # (0.7 accepted either setting for them; 0.8 requires a reset); nor do the options a learner
  # does not read (0.9.7 accepted any value for them).
  name = b.get('learner.name')
  ignored = (() if learners.warm_optimizer(name) else ('learner.reset_optimizer',)) + tuple(
      f'learner.{key}' for key in learners.unread_options(name))
  return sorted(k for k in set(a) | set(b)
                if k.split('.')[0] not in RESUMABLE and k not in RESUMABLE + ignored
                and not same(a.get(k), b.get(k)))
