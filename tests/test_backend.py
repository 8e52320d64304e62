"""What a run asks of the XLA backend: deterministic GPU kernels, the persistent compilation
cache, and no program compiled twice; where a profiled program's time goes."""
import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alma_jax import backend, data as alma_data, learners, placement, run, sharding, steps
from alma_jax import stream as alma_stream
from conftest import REPO


def _python(code: str, **env) -> str:
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **env}, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


def test_deterministic_gpu_kernels_are_asked_for_before_the_backend_starts(config):
  out = _python(
      'import os, jax\n'
      'from alma_jax import backend, config\n'
      'backend.configure(config.base().backend)\n'
      'print(os.environ["XLA_FLAGS"]); jax.devices()', XLA_FLAGS='--xla_dump_to=/dev/null')
  assert out.split() == ['--xla_dump_to=/dev/null', backend.DETERMINISTIC_GPU_FLAG]
  assert backend.without_determinism(out) == '--xla_dump_to=/dev/null'


@pytest.mark.parametrize('flags, deterministic', [
    ('', False), ('--xla_gpu_deterministic_ops', True), ('--xla_gpu_deterministic_ops=true', True),
    ('--xla_gpu_deterministic_ops=false', False), ('--xla_gpu_deterministic_ops=1 --x=2', True),
    ('--xla_gpu_deterministic_ops=true --xla_gpu_deterministic_ops=false', False)])
def test_deterministic_kernels_are_read_off_xla_flags_as_xla_reads_them(monkeypatch, flags,
                                                                        deterministic):
  monkeypatch.setenv('XLA_FLAGS', flags)
  assert backend.deterministic_gpu_kernels() == deterministic
  assert 'deterministic' not in backend.without_determinism(flags)


def test_a_gpu_backend_started_without_determinism_is_refused(config, monkeypatch):
  jax.devices()  # the backend has started
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  with pytest.raises(RuntimeError, match='config.backend.deterministic'):
    backend.configure(config.backend)
  config.backend.deterministic = False
  backend.configure(config.backend)


def test_the_compilation_cache_a_config_names_is_the_one_used_in_the_same_process(tmp_path):
  """JAX sets its cache up at the first compilation: a later run in the same process (a
  notebook, a sweep in one process) with another directory, or none, used to keep the first."""
  out = _python(
      'import os, jax, jax.numpy as jnp\n'
      'from alma_jax import backend, config\n'
      'c = config.base().backend\n'
      'def compile_in(cache, n):\n'
      '  c.compilation_cache = cache\n'
      '  backend.configure(c)\n'
      '  jax.jit(lambda x: x * n)(jnp.ones(n)).block_until_ready()\n'
      f'  print([len(os.listdir(p)) if os.path.isdir(p) else 0\n'
      f'         for p in ({str(tmp_path / "a")!r}, {str(tmp_path / "b")!r})])\n'
      f'compile_in({str(tmp_path / "a")!r}, 2)\n'
      f'compile_in({str(tmp_path / "b")!r}, 3)\n'
      'compile_in("", 4)\n'
      'print(jax.config.jax_compilation_cache_dir)')
  *counts, directory = out.splitlines()
  (a, none_yet), (still_a, b), after_none = map(json.loads, counts)
  assert a > 0 and none_yet == 0  # a's programs in a
  assert still_a == a and b > 0   # b's in b
  assert after_none == [a, b] and directory == 'None'  # none's nowhere


def test_a_compilation_cache_that_cannot_be_written_is_named_and_left_out(tmp_path):
  (tmp_path / 'file').write_text('')
  result = subprocess.run(
      [sys.executable, '-c',
       'import jax, jax.numpy as jnp\n'
       'from alma_jax import backend, config\n'
       'c = config.base().backend\n'
       f'c.compilation_cache = {str(tmp_path / "file" / "cache")!r}\n'
       'backend.configure(c)\n'
       'jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()\n'
       'print(jax.config.jax_compilation_cache_dir)'],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ['None']
  assert "config.backend.compilation_cache='" in result.stderr
  assert 'compiling without a persistent cache' in result.stderr
  assert 'Error reading persistent compilation cache' not in result.stderr


def test_a_repeated_run_loads_its_programs_from_the_compilation_cache(config, tmp_path):
  config.stream.num_megabatches = 2
  summaries = []
  for name in ('first', 'again'):
    args = [f'--config.{k}={v}' for k, v in (
        ('data.path', config.data.path), ('data.mean', '(0.5,)'), ('data.std', '(0.3,)'),
        ('stream.num_megabatches', 2), ('model.hidden', 16), ('train.max_epochs', 2),
        ('log.tensorboard', False), ('backend.compilation_cache', tmp_path / 'cache'))]
    subprocess.run([sys.executable, '-m', 'alma_jax.main', '--config=configs/fashion_mnist.py',
                    f'--workdir={tmp_path / name}', *args], check=True, cwd=REPO,
                   capture_output=True, timeout=300)
    with open(tmp_path / name / run.SUMMARY_FILE) as f:
      summaries.append(json.load(f))
  first, again = summaries
  assert first['compilations_from_cache'] == 0 and first['compilations'] > 0
  assert again['compilations_from_cache'] == again['compilations'] == first['compilations']
  assert again['final_error'] == first['final_error']


def test_fresh_members_and_trained_ones_share_their_compiled_programs(config):
  """A caller's fresh members, the learner's own and its trained ones are placed alike, so
  an epoch, a validation and a test evaluation compile once over a whole stream."""
  dataset = alma_data.load(config.data)
  mesh = sharding.make_mesh()
  learner = learners.create(config, dataset, placement.device_data(dataset, mesh), mesh)
  indices, n = steps.pad_indices(np.arange(256)[None], config.train.batch_size)
  weights = (np.arange(indices.shape[1]) < n).astype(np.float32)[None]
  variables = learner.new_members(jax.random.key(0), 1)
  opt_state = learner.init_optimizer(variables)
  for epoch in range(3):
    variables, opt_state = learner.trainer.train_epoch(
        variables, opt_state, learner.data.train_images, learner.data.train_labels, indices,
        weights, n, jax.random.split(jax.random.key(1), 1), epoch)
  assert learner.trainer._epochs[False]._cache_size() == 1

  stream = alma_stream.make_stream(len(dataset.train_labels), 5)
  stream_state = alma_stream.init_state(stream.num_examples)
  state = learner.init(jax.random.key(0))
  learner.evaluate(state)
  with backend.Compilations() as compiled:
    for t in range(1, 4):
      stream_state = alma_stream.arrive(stream_state)
      round_data, stream_state = alma_stream.next_round(stream_state, stream, config.stream, 0)
      state, _ = learner.train_round(state, round_data, jax.random.key(t))
      learner.evaluate(state)
      if t == 1:
        after_first_round = compiled.count
  assert compiled.count == after_first_round  # rounds 2 and 3 compiled nothing
  assert learner.tester.sums._cache_size() == learner.validator.sums._cache_size() == 1


def test_a_timed_region_that_compiles_fails_the_measurement():
  """The benchmarks' guard (`backend.no_compilation`) sees a compilation, and lets a call of a
  program already compiled pass."""
  scaled = jax.jit(lambda x: x * 3.0 + 1.0)
  x = jnp.arange(5.0)
  with pytest.raises(backend.CompiledInTimedRegion, match=r'the step: 1 program\(s\) compiled'):
    with backend.no_compilation('the step'):
      scaled(x).block_until_ready()
  with backend.no_compilation('the step'):
    scaled(x).block_until_ready()
  with pytest.raises(backend.CompiledInTimedRegion):
    with backend.no_compilation('the step'):
      scaled(jnp.arange(6.0)).block_until_ready()  # a new shape compiles anew


def test_a_profiled_program_is_summarized_by_its_operations_each_counted_once(tmp_path):
  """experiments/profile_summary.py over a real jax.profiler trace (on CPUs, XLA's operations on
  the host threads), and over a made-up one where an operation encloses another."""
  sys.path.insert(0, os.path.join(REPO, 'experiments'))
  import profile_summary
  f = jax.jit(lambda x: jnp.tanh(x @ x) @ x)
  x = jnp.ones((256, 256))
  f(x).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      f(x).block_until_ready()
  with gzip.open(profile_summary.newest_trace(str(tmp_path))) as trace:
    summary = profile_summary.summary(json.load(trace), steps=3)
  assert summary['by_kind_ms']['matrix multiply'] > 0
  assert sum(summary['by_kind_ms'].values()) == pytest.approx(summary['busy_ms'])
  assert summary['top'][0]['calls'] == 1  # three calls over three steps

  device = [{'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
            {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}}]
  kernel = lambda name, ts, dur, pid=1: {'ph': 'X', 'pid': pid, 'tid': 7, 'ts': ts, 'dur': dur,
                                         'name': name}
  events = [kernel('while.1', 0, 10), kernel('gemm_fusion.2', 2, 3),
            kernel('loop_fusion.3', 6, 1), kernel('host_work', 0, 50, pid=2),
            kernel('nvjet_sm90_tst_128x128', 20, 4), kernel('mha_backward', 22, 4),  # overlap
            kernel('DeviceRadixSortOnesweepKernel', 30, 2)]
  summary = profile_summary.summary({'traceEvents': device + events})
  assert summary['span_ms'] == pytest.approx(0.032)  # the device's events, not the host's
  assert summary['busy_ms'] == pytest.approx(0.020)
  assert summary['by_kind_ms'] == pytest.approx({'other': 0.006, 'matrix multiply': 0.007,
                                                 'attention': 0.004, 'other fusion': 0.001,
                                                 'sort': 0.002})


def test_the_device_summary_reads_a_run_split_over_two_calls_as_one():
  """Run 7 on the H100: the first call's time limit cut three sections, which a second call
  (`--only=peak,steps,lm_default,lm_gpt2_medium`) measured into accelerator_rest_gpu.json."""
  summary = subprocess.run(
      [sys.executable, 'experiments/device_summary.py', 'experiments/results/h100',
       '--prefix=run7_'], capture_output=True, text=True, cwd=REPO, timeout=60, check=True).stdout
  line = lambda what: next(l[len(what) + 2:] for l in summary.splitlines() if l.startswith(what))
  assert line('device') == 'NVIDIA H100 80GB HBM3'
  assert line('matmul peak, TFLOP/s') == '768 (bfloat16)'  # the second call's section wins
  assert line('GPT-2-small MFU, auto attention (target >= 0.40)').startswith('0.449 ')
  assert line("GPT-2-medium MFU (blocks recomputed: PaLM's count is the model's)").startswith(
      '0.413, ')  # only in the second call's file
  assert line('demo rows identical: again, resumed') == 'True, True'
  assert 'not measured' not in summary
