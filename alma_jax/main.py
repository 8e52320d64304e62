"""Runs the ALMA protocol: python -m alma_jax.main --config=configs/fashion_mnist.py --workdir=DIR.

On several hosts (a TPU pod, a GPU cluster), run the same command on every host with
`--multihost` (JAX finds the coordinator on TPU pods and SLURM), or name the coordinator with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
"""
import signal
import sys

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from alma_jax import backend, run

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: outputs and checkpoints (on '
                               'a file system that every host sees, for multi-host runs).')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Join a multi-process run '
                               '(jax.distributed.initialize).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0 '
                                   '(implies --multihost; default: found by JAX).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax and JAX log every checkpoint at INFO.
  backend.configure(_CONFIG.value.backend)  # XLA flags are read when the backend starts
  if _MULTIHOST.value or _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    run.run(_CONFIG.value, _WORKDIR.value)
  except run.Interrupted as stop:  # said on the console; the usual status of that signal
    sys.exit(128 + signal.Signals[stop.signal_name].value)


if __name__ == '__main__':
  app.run(main)
