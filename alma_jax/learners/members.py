"""The engine shared by every learner whose predictor is a stack of members of one model.

Its state is a `MembersState`: the members' variables stacked on a leading axis, their weights
in the prediction, the rounds trained so far, and (only when optimizers are kept across rounds)
their optimizer states.

A learner module supplies a `Plan`: which members a round trains, from what start, on what data,
how they join the ensemble, and how members combine into one prediction. Everything else
(compiled training of the members side by side, early stopping, FLOPs, evaluation, restore) is
here, once.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from alma_jax import metrics, optim, placement, sharding, steps
from alma_jax.learners import base


@flax.struct.dataclass
class MembersState:
  """variables: the members' Flax variables ({'params', and 'batch_stats' for models with
  BatchNorm}) stacked on a leading axis (M, ...); member_weights: (M,) their weights in the
  prediction; rounds: rounds trained so far; opt_state: their stacked optimizer states, only
  when optimizers are kept across rounds; extra: what a plan of yours keeps besides (a dict
  of arrays, checkpointed with the rest)."""
  variables: Any
  member_weights: jax.Array
  rounds: np.ndarray
  opt_state: Any = None
  extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Work:
  """What a round trains: m members from `start` (stacked variables), each on its own indices."""
  start: Any                        # stacked variables
  train: np.ndarray                 # (m, n) training indices per member
  weights: np.ndarray | None = None  # (m, n) example weights, default 1
  opt_state: Any = None             # kept optimizer states to continue from, else fresh
  extra_flops: float = 0.0          # work done to prepare the round (e.g. measuring for growth)
  resample: bool = False            # epochs draw examples with replacement by weight
  anchor: Any = None                # what the plan's penalty compares the members with (stacked)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A learner, as the few pure functions in which learners differ.

  initial_members: members of the untrained predictor.
  work(learner, state, round, key) -> Work
  merge(learner, state, trained variables, work, round) -> state: how trained members join.
  combine(member logits (M, B, C), member weights (M,)) -> (log-probabilities, predicted class).
  model(module) -> module: the member model built from the config's model (default: itself).
  penalty(params, anchor) -> scalar: added to the training loss of every batch, with the
    round's `Work.anchor` (one member's slice); for regularization-based continual learning.
  check(learner, member) -> None: raises ValueError where the plan cannot work with the model
    and data (`member`: one member's variables, abstract); run when the learner is built.
  """
  initial_members: int
  work: Callable
  merge: Callable
  combine: Callable
  model: Callable = lambda module: module
  penalty: Callable | None = None
  check: Callable | None = None


# How members combine. `weights` (M,) are the members' weights in the prediction; padding
# members (see MemberLearner.evaluate) have weight 0 and no say.
# Logits are (M, B, C) for classifiers, (M, B, L, C) for language models.
def mean_logits(logits, weights):
  present = (weights > 0).astype(logits.dtype)
  mean = jnp.einsum('m,m...->...', present, logits) / jnp.sum(present)
  return jax.nn.log_softmax(mean), jnp.argmax(mean, -1)


def mean_probs(logits, weights):
  """The mean of the members' probabilities, as log-probabilities (log-mean-exp)."""
  present = jnp.where(weights > 0, 0.0, -jnp.inf).reshape((-1,) + (1,) * (logits.ndim - 1))
  log_probs = (jax.nn.logsumexp(jax.nn.log_softmax(logits) + present, 0)
               - jnp.log(jnp.sum(weights > 0)))
  return log_probs, jnp.argmax(log_probs, -1)


def weighted_logits(logits, weights):
  total = jnp.einsum('m,m...->...', weights, logits)
  return jax.nn.log_softmax(total), jnp.argmax(total, -1)


def majority_vote(logits, weights):
  """Most members' class; the class that any member is most confident of gets 0.1 more, which
  breaks ties (the reference's vote, crlapi/sl/clmodels/k_ensemble.py:47-55)."""
  present = weights > 0
  probs = jax.nn.softmax(logits)  # (M, B, C)
  votes = jnp.einsum('m,mbc->bc', present.astype(logits.dtype),
                     jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1]))  # (B, C)
  most_confident = jnp.argmax(jnp.max(jnp.where(present[:, None, None], probs, -1.0), 0), -1)
  votes = votes + 0.1 * jax.nn.one_hot(most_confident, logits.shape[-1])
  return mean_probs(logits, weights)[0], jnp.argmax(votes, -1)


class MemberLearner:
  """A learner over a stack of members of one model; `plan` says how it trains and predicts."""

  def __init__(self, config, dataset, data: placement.DataArrays, mesh, plan: Plan, model):
    # A language model's members combine by their mean probability, which perplexity needs.
    combine = plan.combine if dataset.targets_per_example == 1 else mean_probs
    self.plan = plan
    self.config = config
    self.keep_optimizer = not config.learner.reset_optimizer
    self.data = data
    self.num_classes = dataset.num_classes
    self.test_indices = np.arange(len(dataset.test_labels))
    self.model = model
    self.optimizer = optim.build(config.optimizer)
    self.example = np.zeros((1,) + dataset.image_shape, np.uint8)

    # Preprocessed and keyed inside traced code only: run eagerly, each operation is a program
    # that every run traces, lowers and loads before its first arrival.
    init = lambda key: self.model.init(key, dataset.preprocess(self.example))
    member = jax.eval_shape(lambda: init(jax.random.key(0)))
    if plan.check is not None:
      plan.check(self, member)
    collections = [c for c in member if c != 'params']

    def apply_fn(variables, images):
      """A member's logits in evaluation mode (BatchNorm uses its running statistics)."""
      return self.model.apply(variables, dataset.preprocess(images), train=False)

    def apply_train(variables, images, key, real):
      """A member's logits in training mode (augmented inputs), and its updated statistics,
      which count only the `real` (not padding) examples of the batch."""
      x = dataset.preprocess(dataset.augment(images, key))
      if not collections:
        return self.model.apply(variables, x, train=True), {}
      return self.model.apply(variables, x, train=True, mutable=collections,
                              mask=real.reshape((-1,) + (1,) * (x.ndim - 1)))

    def member_metric(variables, images, labels, weights):
      logits = apply_fn(variables, images)
      return base.prediction_sums(jax.nn.log_softmax(logits), jnp.argmax(logits, -1), labels,
                                  weights)

    def ensemble(variables, member_weights, images):
      logits = jax.vmap(apply_fn, (0, None), spmd_axis_name=sharding.MEMBER)(variables, images)
      return combine(logits, member_weights)

    def test_metric(variables_and_weights, images, labels, weights):
      return base.prediction_sums(*ensemble(*variables_and_weights, images), labels, weights)

    self._init_members = jax.jit(
        lambda key, count: jax.vmap(init)(jax.random.split(key, count)), static_argnums=1)
    self.apply_fn = apply_fn
    self._init_optimizer = jax.jit(jax.vmap(self.optimizer.init))  # one program, not one a leaf
    self.preprocess = dataset.preprocess
    self.ensemble = ensemble
    self.trainer = steps.Trainer(
        base.cross_entropy_loss(apply_train), self.optimizer, config.train.batch_size, mesh,
        whole_epochs_compiled(config.train.compiled_epoch, apply_fn,
                              jax.eval_shape(lambda k: self._init_members(k, 1),
                                             jax.random.key(0)),
                              self.example),
        config.train.microbatches, plan.penalty, config.mesh.get('shard_params', False),
        config.data.prefetch, config.data.feed_steps)
    self.validator = steps.Evaluator(jax.vmap(member_metric, (0, None, None, None),
                                              spmd_axis_name=sharding.MEMBER),
                                     config.train.eval_batch_size, mesh, config.data.prefetch)
    self.tester = steps.Evaluator(test_metric, config.train.eval_batch_size, mesh,
                                  config.data.prefetch)
    self._flops = {}

  # Members.
  def new_members(self, key, count: int):
    """The variables of `count` freshly initialized members, stacked and placed where trained
    members are (so both share one compiled evaluation and epoch)."""
    return self.trainer.place_members(self._init_members(key, count))

  def member(self, variables, i: int, count: int = 1):
    """Members i .. i + count - 1 of a stack (negative i counts from the end)."""
    return _members(variables, i % jax.tree.leaves(variables)[0].shape[0], count)

  def repeat(self, variables, count: int):
    """A stack of `count` copies of the first member of `variables`."""
    return _repeated(variables, count)

  def num_members(self, state: MembersState) -> int:
    return int(state.member_weights.shape[0])

  def init_optimizer(self, variables):
    return self._init_optimizer(variables['params'])

  def init(self, key) -> MembersState:
    m = self.plan.initial_members
    variables = self.new_members(key, m)
    return MembersState(variables, _ones(m), np.int64(0),
                        self.init_optimizer(variables) if self.keep_optimizer else None)

  def flops(self, variables=None) -> dict:
    """For one member shaped like the stack `variables` (default: a new member): its train
    step's FLOPs, its forward FLOPs per example, and its forward FLOPs per example in the
    reference's convention. Computed once per shape: growth changes it."""
    if variables is None:
      variables = jax.eval_shape(lambda key: self.new_members(key, 1), jax.random.key(0))
    signature = str(jax.tree.map(lambda a: a.shape[1:], variables))
    if signature not in self._flops:
      one = jax.eval_shape(first_member, variables)
      opt_state = jax.eval_shape(self.optimizer.init, one['params'])
      x = jax.ShapeDtypeStruct((self.trainer.batch_size,) + self.example.shape[1:], jnp.uint8)
      forward = metrics.cost_flops(jax.jit(self.apply_fn), one, x)
      self._flops[signature] = {
          'step': self.trainer.step_flops(one, opt_state, self.data.train_images,
                                          self.data.train_labels),
          'forward': None if forward is None else forward / self.trainer.batch_size,
          'reference': metrics.reference_flops(self.apply_fn, one, self.example)}
    return self._flops[signature]

  # Training.
  def start_round(self, opt_state, examples: int):
    """`opt_state` at the start of a round over `examples` training examples a member: its
    schedule set to the round's most steps (`train.max_epochs` epochs; `optim.start_round`)."""
    return optim.start_round(opt_state, self.config.train.max_epochs
                             * self.trainer.epoch_steps(examples))

  def fit(self, work: Work, round, key):
    """Trains the members of `work` side by side; returns (variables, opt_state, report)."""
    opt_state = self.start_round(work.opt_state if work.opt_state is not None
                                 else self.init_optimizer(work.start), work.train.shape[-1])
    # Fresh buffers: training donates them, and the state may still hold `work.start`.
    start, opt_state = self.trainer.place(work.start, opt_state, copy=True)
    with RoundProgress(self.config, work.train.size) as progress:
      variables, opt_state, report = base.fit(
          self.trainer, self.validator, start, opt_state, self.data, work.train, round.valid,
          key, self.config.train, self.flops(work.start), work.weights, progress, work.resample,
          work.anchor)
    held = sum(x.nbytes for x in jax.tree.leaves(opt_state))
    return variables, opt_state, report + base.RoundReport(train_flops=work.extra_flops,
                                                           optimizer_bytes=held)

  def train_round(self, state, round, key):
    work_key, fit_key = jax.random.split(key)
    work = self.plan.work(self, state, round, work_key)
    variables, opt_state, report = self.fit(work, round, fit_key)
    state = self.plan.merge(self, state, variables, work, round)
    if self.keep_optimizer:
      state = state.replace(opt_state=opt_state)
    return state.replace(rounds=np.int64(state.rounds + 1)), report

  # The predictor.
  def evaluate(self, state, images=None, labels=None) -> dict:
    """Error and loss on the test set, or on other `images` and `labels` (raw, as the data set
    holds them). The member stack is padded to a power of two with weight-0 copies, so a
    growing ensemble compiles its evaluation once per doubling, not once per member."""
    if images is None:
      images, labels, indices = self.data.test_images, self.data.test_labels, self.test_indices
    else:
      images = self._as_held(images, labels)
      indices = np.arange(len(labels))
    padded = self.padded(state.variables, state.member_weights)
    return base.error_and_loss(self.tester(padded, images, labels, indices))

  def padded(self, variables, member_weights):
    """`padded_members`, placed as trained stacks are: a stack of 3 and one of 4 then compile
    one program over them."""
    return self.trainer.place_members(padded_members(variables, member_weights))

  def _as_held(self, images, labels):
    """`images` as the data set holds its own (integers cast to its dtype), or ValueError if
    they, or `labels`, are not examples of it."""
    held = self.data.test_images
    integers = lambda a: np.issubdtype(a.dtype, np.integer)
    if images.shape[1:] != held.shape[1:] or (
        images.dtype != held.dtype and not (integers(images) and integers(held))):
      pad = self.config.data.get('pad_to', 0)
      raise ValueError(f'examples of {images.dtype} {tuple(images.shape[1:])}: give them raw, as '
                       f'the data set holds them ({held.dtype} {tuple(held.shape[1:])}'
                       + (f', images padded by data.pad_images(images, {pad})' if pad else '')
                       + '); the model normalizes them itself')
    if not len(labels) or len(images) != len(labels):
      raise ValueError(f'{len(images)} examples and {len(labels)} labels: give as many of each, '
                       f'at least one')

    def within(values, name, low, high):
      if int(np.min(values)) < low or int(np.max(values)) > high:
        raise ValueError(f'{name} from {int(np.min(values))} to {int(np.max(values))}: this '
                         f'data set has {low} to {high}')

    within(labels, 'labels', 0, self.num_classes - 1)
    if self.config.data.task == 'language_model':
      within(images, 'tokens', 0, self.num_classes - 1)
    elif images.dtype != held.dtype:  # integers of another type
      within(images, 'values', np.iinfo(held.dtype).min, np.iinfo(held.dtype).max)
    return images if images.dtype == held.dtype else images.astype(held.dtype)

  def parameters(self, state):
    """The predictor's parameters (all members, stacked; BatchNorm statistics are not)."""
    return state.variables['params']

  def params(self, state) -> int:
    """How many parameters the predictor has."""
    return metrics.num_params(self.parameters(state))

  def inference_flops(self, state) -> float:
    forward = self.flops(state.variables)['forward']
    return float('nan') if forward is None else forward * self.num_members(state)

  def restore(self, tree):
    """The state saved as `tree`, whatever its number of members or tree of experts (also as
    the first versions saved it: parameters at the top, before BatchNorm statistics existed)."""
    if 'variables' not in tree:
      tree = {**{k: v for k, v in tree.items() if k != 'params'},
              'variables': {'params': tree['params']}}
    opt_state = None
    if self.keep_optimizer:  # optax states are named tuples: rebuild them from a template
      template = jax.eval_shape(self.init_optimizer, tree['variables'])
      opt_state = base.restore_like(template, tree['opt_state'])
    return MembersState(
        self.trainer.place_members(tree['variables']),
        tree['member_weights'], np.int64(tree['rounds']), opt_state, tree.get('extra', {}))


class RoundProgress:
  """What the console shows while a round trains (process 0): a progress bar over its epochs
  with the best validation score and examples/s (`config.log.progress`: 'auto' shows it when
  stderr is a terminal; 'on', 'off'), removed when the round ends so the arrival's row follows;
  and with `config.log.epochs`, a line per epoch."""

  def __init__(self, config, examples_per_epoch: int):
    self.stop_on = config.train.stop_on
    self.lines = config.log.epochs and sharding.is_main_process()
    setting = config.log.progress
    show = setting == 'on' or (setting == 'auto' and sys.stderr.isatty())
    self.bar = (tqdm.tqdm(total=config.train.max_epochs, desc='      round', unit='epoch',
                          leave=False, file=sys.stderr, dynamic_ncols=True)
                if show and sharding.is_main_process() else None)
    self.examples_per_epoch = examples_per_epoch
    self.began = time.perf_counter()

  def _shown(self, scores) -> str:
    return ' '.join(f'{s:.4f}' if self.stop_on == 'accuracy' else f'{-s:.4f}' for s in scores)

  def __call__(self, epoch: int, scores) -> None:
    seconds = time.perf_counter() - self.began
    if self.lines:  # above the bar, if there is one
      line = (f'      epoch {epoch + 1}: validation {self.stop_on} {self._shown(scores)} '
              f'({seconds:.1f} s)')
      if self.bar is not None:
        self.bar.write(line)
      else:
        print(line, flush=True)
    if self.bar is not None:
      self.bar.set_postfix_str(f'validation {self.stop_on} {self._shown(scores)}, '
                               f'{self.examples_per_epoch * (epoch + 1) / seconds:,.0f} '
                               f'examples/s', refresh=False)
      self.bar.update(1)

  def __enter__(self) -> 'RoundProgress':
    return self

  def __exit__(self, *exc) -> None:
    if self.bar is not None:
      self.bar.close()


def whole_epochs_compiled(setting: str, apply_fn, variables, example) -> bool:
  """Whether epochs run as one compiled loop: 'yes', 'no', or 'auto' (yes, unless on CPU with
  convolutions in the model, which XLA:CPU runs slowly inside loops)."""
  if setting != 'auto':
    return setting == 'yes'
  one = jax.eval_shape(first_member, variables)
  convolutions = any(eqn.primitive.name == 'conv_general_dilated'
                     for eqn, _ in metrics.equations(apply_fn, one, example))
  return not (convolutions and jax.default_backend() == 'cpu')


# Whole stacks in one compiled program each (an eager op per leaf compiles one per leaf).
@jax.jit
def first_member(stack):
  """Member 0 of a stack, without the member axis."""
  return jax.tree.map(lambda a: a[0], stack)


@jax.jit
def as_stack(one):
  """One member's variables as a stack of one."""
  return jax.tree.map(lambda a: a[None], one)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _members(variables, i: int, count: int):
  return jax.tree.map(lambda p: p[i:i + count], variables)  # static: moves only these members


@functools.partial(jax.jit, static_argnums=1)
def _repeated(variables, count: int):
  return jax.tree.map(lambda p: jnp.repeat(p[:1], count, axis=0), variables)


@jax.jit
def _concatenated(stack, more):
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), stack, more)


def padded_members(variables, member_weights):
  """(variables, member_weights) padded to a power of two members with copies of the first, of
  weight 0: what compiled work over a growing stack takes, so it compiles once per doubling."""
  m = member_weights.shape[0]
  size = 1 << (m - 1).bit_length()
  return (variables, member_weights) if size == m else _pad_members(variables, member_weights,
                                                                     size)


@functools.partial(jax.jit, static_argnums=2)
def _pad_members(variables, member_weights, size: int):
  pad = size - member_weights.shape[0]
  variables = jax.tree.map(lambda p: jnp.concatenate([p, jnp.repeat(p[:1], pad, 0)]), variables)
  return variables, jnp.concatenate([member_weights, jnp.zeros(pad, member_weights.dtype)])


# Helpers for plans.
def _ones(m: int) -> jax.Array:
  """Member weights of 1, put on the device rather than computed there (no program to load)."""
  return jax.device_put(np.ones(m, np.float32))


def same_data(round, members: int) -> np.ndarray:
  return np.broadcast_to(round.train, (members, len(round.train)))


def replace(learner, state, variables, work, round):
  """The trained members become the whole predictor."""
  del learner, work, round
  m = jax.tree.leaves(variables)[0].shape[0]
  return state.replace(variables=variables, member_weights=_ones(m))


def append(learner, state, variables, work, round, weights=None):
  """The trained members join the frozen ones (or replace the untrained start, first round)."""
  del learner, work, round
  m = jax.tree.leaves(variables)[0].shape[0]
  weights = _ones(m) if weights is None else weights
  if int(state.rounds) == 0:
    return state.replace(variables=variables, member_weights=weights)
  stacked, member_weights = _concatenated((state.variables, state.member_weights),
                                           (variables, weights))
  return state.replace(variables=stacked, member_weights=member_weights)
