"""What a run asks of the XLA backend before it starts, and what the backend compiles.

Deterministic kernels: on GPUs, XLA picks some reduction, scatter and convolution algorithms that
accumulate in a varying order, so two runs of one config differ in their last bits from the first
step on, and a resumed run differs from an uninterrupted one. `--xla_gpu_deterministic_ops`
makes XLA pick deterministic ones. XLA reads its flags when the backend starts, so `configure`
sets it before the first device is touched (`alma_jax.main` calls it first thing) and refuses a
GPU backend that started without it. CPU and TPU programs are deterministic as compiled.

The persistent compilation cache (JAX's `jax_compilation_cache_dir`) keeps every compiled program
on disk, so a resume, a repeated run and every run of a sweep after the first load them instead
of compiling.
"""
from __future__ import annotations

import contextlib
import errno
import os

from absl import logging
import jax
from jax import monitoring
from jax.experimental.compilation_cache import compilation_cache

DETERMINISTIC_GPU_FLAG = '--xla_gpu_deterministic_ops=true'
_DETERMINISTIC_NAME = DETERMINISTIC_GPU_FLAG.partition('=')[0]
# Every program goes to the persistent cache: JAX's default (only those compiling for over 1 s)
# leaves the start-up of a small model's run uncached.
MIN_CACHED_COMPILE_SECONDS = 0.0
_COMPILE_EVENTS = ('/jax/core/compile/jaxpr_trace_duration',
                   '/jax/core/compile/jaxpr_to_mlir_module_duration',
                   '/jax/core/compile/backend_compile_duration')
_CACHE_HIT_EVENT = '/jax/compilation_cache/cache_hits'


def configure(config) -> None:
  """Applies `config` (the `backend` section) to this process; call before any device work."""
  if config.deterministic:
    if not deterministic_gpu_kernels():
      if _backend_started():
        if jax.default_backend() == 'gpu':
          raise RuntimeError(
              'config.backend.deterministic=True, but the GPU backend started without '
              f'XLA_FLAGS={DETERMINISTIC_GPU_FLAG}: set it in the environment before JAX '
              'touches a device (alma_jax.main does), or set '
              'config.backend.deterministic=False to accept runs that differ in the last bits')
      else:
        flags = os.environ.get('XLA_FLAGS', '')
        os.environ['XLA_FLAGS'] = f'{flags} {DETERMINISTIC_GPU_FLAG}'.strip()
  _keep_programs_in(config.compilation_cache)


def _keep_programs_in(path: str) -> None:
  """Where the programs compiled from now on are kept ('' for nowhere), in this process too:
  JAX sets its cache up once, at its first compilation, so a change resets it. A directory
  that cannot be written is warned about, and programs are compiled without a cache."""
  directory = os.path.expanduser(path) if path else None
  if directory:
    try:
      os.makedirs(directory, exist_ok=True)
      if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, 'not writable', directory)
    except OSError as error:
      logging.warning('config.backend.compilation_cache=%r cannot hold compiled programs (%s): '
                      "compiling without a persistent cache (set it to a writable directory, "
                      "or to '' for none)", path, error)
      directory = None
  if directory != jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', directory)
    compilation_cache.reset_cache()
  if directory:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_CACHED_COMPILE_SECONDS)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def deterministic_gpu_kernels() -> bool:
  """Whether this process asks XLA for deterministic GPU kernels (its XLA_FLAGS, which XLA
  reads when the backend starts; `--xla_gpu_deterministic_ops` alone means true)."""
  value = None
  for flag in os.environ.get('XLA_FLAGS', '').split():
    name, _, given = flag.partition('=')
    if name == _DETERMINISTIC_NAME:
      value = given.lower() in ('', 'true', '1')  # the last one given wins, as in XLA
  return bool(value)


def without_determinism(flags: str) -> str:
  """An XLA_FLAGS value without `--xla_gpu_deterministic_ops` (for a child process that is to
  run without deterministic kernels)."""
  return ' '.join(f for f in flags.split() if f.partition('=')[0] != _DETERMINISTIC_NAME)


def _backend_started() -> bool:
  from jax._src import xla_bridge  # no public way to ask without starting it
  return xla_bridge.backends_are_initialized()


class Compilations:
  """Counts the programs XLA compiles while active (`count`, those loaded from the persistent
  cache included: `loaded`), and the seconds spent tracing, lowering and compiling them."""

  def __init__(self):
    self.count = 0
    self.loaded = 0
    self.seconds = 0.0

  def _duration(self, event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
      self.seconds += duration
      self.count += event == _COMPILE_EVENTS[-1]

  def _event(self, event: str, **_) -> None:
    self.loaded += event == _CACHE_HIT_EVENT

  def __enter__(self) -> 'Compilations':
    monitoring.register_event_duration_secs_listener(self._duration)
    monitoring.register_event_listener(self._event)
    return self

  def __exit__(self, *exc) -> None:
    monitoring.unregister_event_duration_listener(self._duration)
    monitoring.unregister_event_listener(self._event)


class CompiledInTimedRegion(RuntimeError):
  """A benchmark's timed region compiled a program, so its time is not steady-state."""


@contextlib.contextmanager
def no_compilation(what: str):
  """Raises CompiledInTimedRegion if anything compiles inside the block (benchmarks' proof
  that they time only compiled work)."""
  with Compilations() as compiled:
    yield
  if compiled.count:
    raise CompiledInTimedRegion(f'{what}: {compiled.count} program(s) compiled in the timed '
                                f'region ({compiled.seconds:.2f} s); its time is not a '
                                f'steady-state figure')
