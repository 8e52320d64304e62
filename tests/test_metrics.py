import math

import jax
import jax.numpy as jnp
import pytest

from alma_jax import learners, metrics, run, sharding
from alma_jax import data as alma_data
from alma_jax.models import VGG, moe
from alma_jax.placement import device_data


def test_cer_is_the_sum_of_the_anytime_errors():
  h = metrics.empty_history(4)
  for t, e in enumerate([0.9, 0.5, 0.25, 0.2], start=1):
    h = metrics.record(h, t, test_error=e, trained=1.0, train_flops=10.0, valid_flops=1.0,
                       params=5.0)
  s = metrics.summary(h)
  assert s['cer'] == pytest.approx(1.85) and s['cer_per_t'] == pytest.approx(1.85 / 4)
  assert s['final_error'] == 0.2 and s['train_flops'] == 40.0
  assert [r['cumulative_flops'] for r in metrics.rows(h)] == [11.0, 22.0, 33.0, 44.0]


def test_partial_history_counts_only_arrivals_so_far():
  h = metrics.record(metrics.empty_history(10), 1, test_error=0.5)
  s = metrics.summary(h)
  assert s['arrivals'] == 1 and s['cer'] == 0.5 and s['cer_per_t'] == 0.5  # over the arrivals done


def test_record_rejects_unknown_fields():
  with pytest.raises(KeyError):
    metrics.record(metrics.empty_history(2), 1, accuracy=0.5)


def test_flops_match_an_analytic_count_for_the_mlp(config):
  config.model.update(hidden=32, num_layers=2)
  dataset = alma_data.load(config.data)
  mesh = sharding.make_mesh()
  learner = learners.create(config, dataset, device_data(dataset, mesh), mesh)
  state = learner.init(jax.random.key(0))
  d, h, c, b = 144, 32, 10, config.train.batch_size
  matmul = 2 * (d * h + h * h + h * c)  # multiply-adds x 2, per example
  forward = learner.flops()['forward']
  assert matmul <= forward <= 1.15 * matmul
  # Backward costs about twice the forward pass (gradients of inputs and of weights, but no
  # input gradient for the first layer); the optimizer update adds a few FLOPs per parameter.
  step = learner.flops()['step']
  backward = 2 * (d * h + 2 * h * h + 2 * h * c)
  params = metrics.num_params(state.variables['params'])
  assert b * (matmul + backward) <= step <= b * (matmul + backward) * 1.2 + 30 * params
  assert learner.params(state) == params == d * h + h + h * h + h + h * c + c
  # The reference's convention counts multiply-adds of the forward pass only (fvcore).
  assert learner.flops()['reference'] == d * h + h * h + h * c


def vgg_reference_flops(width: int, experts: int = 0) -> int:
  """fvcore's count for VGG (or MoE-VGG with `experts` per mixture block) on one 32x32 RGB
  image in evaluation mode: multiply-adds of convolutions and the head, 2 per BatchNorm output,
  and for MoE-VGG each block's gate: 1 per element its 4x4 adaptive pooling reads, and the
  gate's matrix product."""
  total, side, channels = 0, 32, 3
  for block, convs in enumerate(VGG.blocks):
    copies = experts if experts and block > 0 else 1
    if copies > 1:
      total += side * side * channels + 16 * channels * experts
    for _ in range(convs):
      total += copies * (side * side * width * 9 * channels + 2 * side * side * width)
      channels = width
    side //= 2
  return total + width * 10


@pytest.mark.parametrize('width', [4, 16])
def test_reference_flops_count_what_fvcore_counts_for_vgg_and_moe_vgg(width):
  x = jnp.zeros((1, 32, 32, 3))
  for model, experts in ((VGG(width=width), 0), (moe.mixture_of(VGG(width=width), 2), 2)):
    variables = model.init(jax.random.key(0), x)
    counted = metrics.reference_flops(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert counted == vgg_reference_flops(width, experts)


def _train_flops(config, workdir) -> float:
  config.train.update(max_epochs=1, patience=1)
  config.stream.num_megabatches = 2
  return run.run(config, str(workdir))['train_flops']


def test_flops_are_counted_where_the_lowered_program_has_no_analysis(config, tmp_path,
                                                                     monkeypatch):
  """GPU backends give no cost analysis before compilation: the compiled program's count is
  used, within 1% of the lowered count for matrix products (XLA:CPU here)."""
  lowered = _train_flops(config, tmp_path / 'lowered')
  monkeypatch.setattr(jax.stages.Lowered, 'cost_analysis', lambda self: None)
  with pytest.warns(UserWarning, match='compiled for cpu: XLA gave no analysis of the CPU'):
    compiled = _train_flops(config, tmp_path / 'compiled')
  assert lowered > 0 and compiled == pytest.approx(lowered, rel=0.01)


def test_flops_counted_without_a_cpu_device_say_whose_analysis_they_are(monkeypatch):
  """(as under JAX_PLATFORMS=cuda: no CPU device to lower for)"""
  f = jax.jit(lambda x, y: jnp.tanh(x @ y))
  x = jnp.ones((64, 32))
  expected = metrics.cost_flops(f, x, x.T)
  devices = jax.devices

  def no_cpu(backend=None):
    if backend == 'cpu':
      raise RuntimeError('Unknown backend cpu')
    return devices(backend)

  monkeypatch.setattr(jax, 'devices', no_cpu)
  with pytest.warns(UserWarning, match=r'no CPU lowering \(RuntimeError: Unknown backend cpu\)'):
    assert metrics.cost_flops(f, x, x.T) == pytest.approx(expected, rel=0.01)


def test_a_backend_without_any_flop_count_says_so(config, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(jax.stages.Lowered, 'cost_analysis', lambda self: None)
  monkeypatch.setattr(jax.stages.Compiled, 'cost_analysis', lambda self: None)
  assert math.isnan(_train_flops(config, tmp_path))
  assert 'training FLOPs not counted' in capsys.readouterr().out


def test_flops_do_not_depend_on_where_the_arguments_live(config):
  """The count is of the program lowered for the CPU from abstract arguments, so placement on
  any backend or mesh does not change it."""
  f = jax.jit(lambda x, y: jnp.tanh(x @ y))
  x = jnp.ones((64, 32))
  placed = jax.device_put(x, sharding.replicated(sharding.make_mesh()))
  assert metrics.cost_flops(f, x, x.T) == metrics.cost_flops(f, placed, placed.T) >= 2 * 64 ** 2 * 32


def test_reference_flops_count_the_default_branch_of_a_choice_by_platform():
  """A GPU program's choice of kernel by platform (the one-hot lookup, Pallas's attention) holds
  both branches in its jaxpr: the reference convention counts what a CPU runs, 0 here (an add),
  not the CUDA branch's matmul as well."""
  def chosen(x):
    return jax.lax.platform_dependent(x, cuda=lambda x: x @ x, default=lambda x: x + 1)
  x = jnp.ones((3, 3))
  assert metrics.reference_flops(chosen, x) == 0
  assert metrics.reference_flops(lambda x: x @ x, x) == 27
  cpu_matmul = lambda x: jax.lax.platform_dependent(x, cpu=lambda x: x @ x, cuda=lambda x: x + 1)
  assert metrics.reference_flops(cpu_matmul, x) == 27  # a CPU's own branch, where there is one
