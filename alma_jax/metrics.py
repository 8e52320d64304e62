"""The ALMA numbers, computed once: anytime error curve, CER, parameters, FLOPs.

The per-arrival history is a dict of arrays of length T (one entry per arrival, NaN until the
arrival happened); it lives in the run state, so it is checkpointed with the model it describes.
Everything that reports a number (console, JSON lines, TensorBoard, analysis) reads it from here.
"""
from __future__ import annotations

import functools
import math
import warnings

import flax.linen as nn
import jax
import numpy as np

from alma_jax.models import layers
from alma_jax.models.layers import AdaptiveAvgPool

# name -> dtype of the per-arrival history.
HISTORY_FIELDS = {
    'trained': np.float64,          # 1 if a training round ran after this arrival
    'test_error': np.float64,       # E_t: 1 - accuracy on the full test set (per token for LMs)
    'test_loss': np.float64,        # mean test cross-entropy (nats per example, or per token)
    'train_flops': np.float64,      # this round: train step FLOPs x steps run, + growth's work
    'valid_flops': np.float64,      # this round: forward FLOPs x validation examples evaluated
    'reference_flops': np.float64,  # the reference's convention: forward FLOPs x examples seen
    'train_examples': np.float64,   # examples seen in training this round (all epochs)
    'train_tokens': np.float64,     # targets trained on this round: examples x tokens per example
    'epochs': np.float64,           # epochs run this round
    'params': np.float64,           # parameters of the predictor after this arrival
    'buffer_bytes': np.float64,     # training and validation examples held for rounds to come
    'optimizer_bytes': np.float64,  # optimizer state this arrival's round trained with
    'inference_flops': np.float64,  # forward FLOPs per test example of the predictor
    'seconds': np.float64,          # wall time of this arrival (training + evaluation)
}


def empty_history(num_arrivals: int) -> dict[str, np.ndarray]:
  return {name: np.full(num_arrivals, np.nan, dtype) for name, dtype in HISTORY_FIELDS.items()}


def completed(history: dict) -> dict:
  """A copy of `history` with the fields a run of an earlier version lacks (NaN)."""
  return {**empty_history(len(history['test_error'])),
          **{k: np.array(v, copy=True) for k, v in history.items()}}


def record(history: dict, t: int, **values) -> dict:
  """A copy of `history` with arrival `t` (1-based) filled in."""
  unknown = set(values) - set(HISTORY_FIELDS)
  if unknown:
    raise KeyError(f'unknown history fields {sorted(unknown)}')
  new = completed(history)
  for name, value in values.items():
    new[name][t - 1] = value
  return new


def num_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def cost_flops(fn, *args) -> float | None:
  """FLOPs of `fn(*args)` (args may be abstract; `fn` jitted or not) by XLA's cost analysis.

  The count is of the program lowered for this process's CPU device, before optimization, whatever
  the backend that runs it: the same number on CPU, GPU and TPU, and a count of the math where an
  accelerator runs a library kernel (cuDNN attention, cuBLAS) that its own analysis does not see
  or undercounts (on an H200 the compiled program's analysis read GPT-2 small's step 4x low with
  XLA's attention, 10x with cuDNN's). Where no CPU analysis can be had, the program compiled for
  this backend is analyzed, with a warning (it can read low). None when neither gives a count:
  callers record NaN, never 0. XLA counts a loop's body once, whatever its trip count: count
  programs without loops (one step, one forward); models' scanned layers are traced unrolled here
  (`layers.unrolled_scans`), `fn`'s Python function afresh (JAX's trace cache does not see that
  setting: a trace it shared with running code would be stale either way).
  """
  jitted = jax.jit(functools.partial(getattr(fn, '__wrapped__', fn)))  # a partial: a new key
  with layers.unrolled_scans():
    try:
      on_cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_cpu),
                              args)
      flops = _flops(jitted.lower(*abstract).cost_analysis())
      why = 'XLA gave no analysis of the CPU lowering'
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as error:  # no CPU backend
      flops, why = None, f'no CPU lowering ({type(error).__name__}: {str(error)[:120]})'
    if flops is None:
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
      flops = _flops(jitted.lower(*abstract).compile().cost_analysis())
      if flops is not None:
        warnings.warn(f'FLOPs of {getattr(fn, "__name__", "a program")} counted by the cost '
                      f'analysis of the program compiled for {jax.default_backend()}: {why}. '
                      f'An accelerator\'s analysis can read low where library kernels run.',
                      stacklevel=2)
  return flops


def _flops(analysis) -> float | None:
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    return None
  return float(analysis['flops'])


def equations(fn, *args):
  """(equation, how many times it runs) for every equation of `fn(*args)`'s jaxpr, those inside
  nested jaxprs (jit, vmap, ...) too; a scan's body runs `length` times. Of a choice made by
  platform (`lax.platform_dependent`), only the branch a CPU runs (its own, else the default):
  the same count on every backend."""

  def cpu_branch(branches, platforms):
    chosen = [i for i, p in enumerate(platforms) if p is not None and 'cpu' in p]
    chosen = chosen or [i for i, p in enumerate(platforms) if p is None]
    return [branches[i] for i in chosen[:1]]

  def walk(jaxpr, times):
    for eqn in jaxpr.eqns:
      yield eqn, times
      inner = times * eqn.params['length'] if eqn.primitive.name == 'scan' else times
      params = dict(eqn.params)
      if params.get('branches_platforms'):
        params['branches'] = cpu_branch(params['branches'], params['branches_platforms'])
      for value in params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          sub = getattr(sub, 'jaxpr', sub)  # a ClosedJaxpr holds its Jaxpr
          if hasattr(sub, 'eqns'):
            yield from walk(sub, inner)

  return walk(jax.make_jaxpr(fn)(*args).jaxpr, 1)


def _fvcore_module_flops(module, x) -> int:
  """What fvcore counts for a call of a Flax module (0 for those it ignores or we count from
  the jaxpr): BatchNorm 2 per input element in evaluation mode (5 in training), adaptive average
  pooling 1 per input element (fvcore/nn/jit_handles.py: batchnorm_flop_jit,
  elementwise_flop_counter(1, 0) for aten::adaptive_avg_pool2d)."""
  if isinstance(module, nn.BatchNorm):
    return x.size * (2 if module.use_running_average else 5)
  if isinstance(module, AdaptiveAvgPool):
    return x.size
  return 0


def reference_flops(fn, *args) -> int:
  """FLOPs of `fn(*args)` as the reference counts them (fvcore's FlopCountAnalysis on one
  input in evaluation mode, crlapi/sl/clmodels/core.py:38-48): one per multiply-add of the
  matrix products and convolutions (read off the jaxpr), plus BatchNorm and adaptive average
  pooling (read off the Flax modules called); biases, activations, max-pooling, softmax and
  elementwise arithmetic are not counted."""
  modules = []

  def record(call, args, kwargs, context):
    if context.method_name == '__call__' and args:
      modules.append(_fvcore_module_flops(context.module, args[0]))
    return call(*args, **kwargs)

  with nn.intercept_methods(record):
    eqns = list(equations(fn, *args))
  total = sum(modules)
  for eqn, times in eqns:
    out = times * math.prod(eqn.outvars[0].aval.shape)
    if eqn.primitive.name == 'dot_general':
      (contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += out * math.prod(lhs[d] for d in contracting)
    elif eqn.primitive.name == 'conv_general_dilated':
      rhs, spec = eqn.invars[1].aval.shape, eqn.params['dimension_numbers'].rhs_spec
      total += out * math.prod(rhs[d] for d in spec[1:])  # input features x kernel window
  return total


def cer(errors) -> float:
  """Cumulative error rate: the area under the anytime error curve, sum_t E_t."""
  return float(np.sum(errors))


def rows(history: dict) -> list[dict]:
  """One dict per arrival so far, with cumulative FLOPs: what the table and JSON lines show."""
  done = int(np.sum(~np.isnan(history['test_error'])))
  # NaN (no FLOP count on this backend) stays NaN, never a silent 0.
  cumulative = np.cumsum((history['train_flops'] + history['valid_flops'])[:done])
  out = []
  for i in range(done):
    row = {'t': i + 1}
    row.update({name: float(values[i]) for name, values in history.items()})
    row['trained'] = bool(row['trained'])
    row['cumulative_flops'] = float(cumulative[i])
    row['test_perplexity'] = math.exp(min(row['test_loss'], 700.0))
    row['test_bits'] = row['test_loss'] / math.log(2)  # per target: bits per byte for byte LMs
    out.append(row)
  return out


def summary(history: dict) -> dict:
  """Final error and loss, CER, CER/T, the area under the test loss curve (the language
  model's CER), total training FLOPs (both conventions), params, the peak bytes of the data
  buffer and of the optimizer state, wall time."""
  errors = history['test_error']
  done = errors[~np.isnan(errors)]
  total = len(errors)
  losses = history['test_loss'][:len(done)]
  final_loss = float(losses[-1]) if len(done) else math.nan
  return {
      'arrivals': int(len(done)),
      'num_megabatches': total,
      'final_error': float(done[-1]) if len(done) else math.nan,
      'cer': cer(done),
      # over the arrivals done: T for a finished run, fewer for one stopped (not comparable)
      'cer_per_t': cer(done) / len(done) if len(done) else math.nan,
      'final_test_loss': final_loss,
      'final_perplexity': math.exp(min(final_loss, 700.0)),
      'final_bits': final_loss / math.log(2),
      'cumulative_loss': float(np.sum(losses)),
      'cumulative_loss_per_t': float(np.sum(losses)) / len(done) if len(done) else math.nan,
      'rounds': int(np.nansum(history['trained'])),
      # NaN where a backend gave no count: a sum over the arrivals done, never a silent 0.
      'train_flops': float(np.sum(history['train_flops'][:len(done)])),
      'valid_flops': float(np.sum(history['valid_flops'][:len(done)])),
      'reference_flops': float(np.sum(history['reference_flops'][:len(done)])),
      'train_examples': float(np.nansum(history['train_examples'])),
      'train_tokens': float(np.nansum(history.get('train_tokens', np.nan))),
      'params': float(history['params'][len(done) - 1]) if len(done) else math.nan,
      # the most memory the data buffer and the optimizer state took at any arrival
      'max_buffer_bytes': _peak(history.get('buffer_bytes'), len(done)),
      'max_optimizer_bytes': _peak(history.get('optimizer_bytes'), len(done)),
      'inference_flops': float(history['inference_flops'][len(done) - 1]) if len(done) else math.nan,
      'seconds': float(np.nansum(history['seconds'])),
  }


def _peak(values, done: int) -> float:
  """The largest of the first `done` values recorded (NaN if none was: a run of an earlier
  version)."""
  values = np.asarray(values if values is not None else [], np.float64)[:done]
  return float(np.nanmax(values)) if np.any(~np.isnan(values)) else math.nan


def format_row(row: dict) -> str:
  return (f"{row['t']:>4d}  {'yes' if row['trained'] else 'no':>7s}  {row['test_error']:10.4f}  "
          f"{row['test_loss']:9.4f}  {row['cumulative_flops']:14.4e}  {int(row['params']):>10,d}  "
          f"{row['seconds']:8.2f}")


TABLE_HEADER = (f"{'t':>4s}  {'trained':>7s}  {'test_error':>10s}  {'test_loss':>9s}  "
                f"{'cum_flops':>14s}  {'params':>10s}  {'seconds':>8s}")


def _count(flops: float) -> str:
  return 'not counted (no cost analysis on this backend)' if math.isnan(flops) else f'{flops:.3e}'


def format_summary(s: dict) -> str:
  return (f"final error {s['final_error']:.4f} | CER {s['cer']:.4f} | CER/T {s['cer_per_t']:.4f} | "
          f"final test loss {s['final_test_loss']:.4f} nats ({s['final_bits']:.4f} bits, "
          f"perplexity {s['final_perplexity']:.3f}), area under the loss curve / T "
          f"{s['cumulative_loss_per_t']:.4f} | "
          f"training FLOPs {_count(s['train_flops'])} (+ validation {_count(s['valid_flops'])}; "
          f"reference convention {s['reference_flops']:.3e}) | params {int(s['params']):,d} | "
          f"peak bytes held: data {_megabytes(s.get('max_buffer_bytes'))}, optimizer state "
          f"{_megabytes(s.get('max_optimizer_bytes'))} | "
          f"{s['rounds']} rounds in {s['seconds']:.1f} s" + _timings(s))


def _megabytes(count) -> str:
  return 'not recorded' if count is None or math.isnan(count) else f'{count / 1e6:.3g} MB'


def _timings(s: dict) -> str:
  """This process's start-up and compilation (part of start-up and of the rounds)."""
  if 'startup_seconds' not in s:
    return ''
  return (f" | start-up {s['startup_seconds']:.1f} s, compiling {s['compile_seconds']:.1f} s "
          f"({s['compilations']} programs, {s['compilations_from_cache']} from the cache)")
