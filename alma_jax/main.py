"""Runs the ALMA protocol: python -m alma_jax.main --config=configs/fashion_mnist.py --workdir=DIR."""
from absl import app, flags, logging
from ml_collections import config_flags

from alma_jax import run

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: outputs and checkpoints.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # Orbax and JAX log every checkpoint at INFO.
  run.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
