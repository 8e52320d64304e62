"""Runs the ALMA protocol: python -m alma_jax.main --config=configs/fashion_mnist.py --workdir=DIR.

On several hosts (a TPU pod, a GPU cluster), run the same command on every host with
`--multihost` (JAX finds the coordinator on TPU pods and SLURM), or name the coordinator with
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.

A mistake (a config file or key that does not exist, an impossible value, a workdir or data set
that cannot be used) prints one line naming it and exits with status 2; `--verbose` adds the
traceback. `--dry_run` checks the config, loads the data, builds the learner and prints the
resolved config and the plan of the run, without running it.
"""
import ast
import difflib
import errno
import gc
import json
import os
import signal
import sys
import threading
import traceback

from absl import app, flags, logging
import jax
import ml_collections
from ml_collections import config_flags

from alma_jax import backend, config as alma_config, data, learners, models, run, sharding
from alma_jax import workdir as workdirs

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:variant]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: outputs and checkpoints (on '
                               'a file system that every host sees, for multi-host runs).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Check the config, load the data, build the '
                             'learner, print the resolved config and the plan, and stop.')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'On an error, print its traceback too.')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Join a multi-process run '
                               '(jax.distributed.initialize).')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'HOST:PORT of process 0 '
                                   '(implies --multihost; default: found by JAX).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-host run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1.')
flags.mark_flags_as_required(['config'])

# What a user's mistake raises. An internal error of one of these types is also shown as one
# line; --verbose shows its traceback.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, run.WorkdirError,
               data.DataNotFoundError, sharding.FailedElsewhere, FloatingPointError)


def _mistake(message: str):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _flat_keys(tree: dict, prefix: str = '') -> list[str]:
  keys = []
  for key, value in tree.items():
    keys.append(prefix + key)
    if isinstance(value, dict):
      keys += _flat_keys(value, f'{prefix}{key}.')
  return keys


# `--config.model.KEY=VALUE` overrides of keys the config file leaves to the model's defaults
# (e.g. `num_experts` after `--config.model.name=moe_mlp`): set after the flags are parsed.
_MODEL_KEYS: dict[str, object] = {}
# With `--config.model.name` naming another model than the file's: the file's model keys that
# the command line does not set, removed after parsing (the named model's defaults apply), but
# for a mixture of the file's model or the reverse (moe_mlp and mlp) only those it lacks.
_OTHER_MODEL_KEYS: list[str] = []


def _model_value(text: str, default):
  """A command-line value read as of the kind of the model key's default (checked against it
  with the config: `models.check`)."""
  if isinstance(default, bool):
    words = {'true': True, '1': True, 'yes': True, 'false': False, '0': False, 'no': False}
    if text.lower() not in words:
      raise ValueError(text)
    return words[text.lower()]
  if isinstance(default, (int, float, tuple)):
    value = ast.literal_eval(text)
    if isinstance(value, list):
      return tuple(value)
    return float(value) if isinstance(default, float) and isinstance(value, int) else value
  return text


def _extensions(argv: list[str], in_file) -> tuple[str, ...]:
  """The modules `--config.extensions=...` names (a tuple, or one name), else the file's."""
  given = [a.split('=', 1)[1] for a in argv if a.startswith('--config.extensions=')]
  if not given:
    return tuple(in_file)
  try:
    value = ast.literal_eval(given[-1])
  except (ValueError, SyntaxError):
    value = given[-1]
  return (value,) if isinstance(value, str) else tuple(value)


def check_arguments(argv: list[str]) -> list[str]:
  """Before absl parses the flags: the config file exists (as given, or in the repository) and
  loads, and every `--config.KEY` override names a key of it or of the model it names (else
  one line, with the closest key). Returns `argv` with the config file's path resolved and the
  model keys the file leaves out taken aside (`_MODEL_KEYS`); a model named instead of the
  file's leaves out the file's model keys (`_OTHER_MODEL_KEYS`)."""
  _MODEL_KEYS.clear()
  _OTHER_MODEL_KEYS.clear()
  specs = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
  if not specs:
    return argv
  path, _, variant = specs[-1].partition(':')
  path = alma_config.resolve(path)
  if not os.path.isfile(path):
    _mistake(f'--config={specs[-1]}: no config file {path!r} (from {os.getcwd()!r})')
  try:
    loaded = alma_config.load(specs[-1])
  except ValueError as error:
    _mistake(f'--config={specs[-1]}: {error}')
  keys = _flat_keys(loaded.to_dict())
  try:  # the user's models (and their keys) registered before the model keys are looked up
    alma_config.import_extensions(ml_collections.ConfigDict(
        {'extensions': _extensions(argv, loaded.get('extensions', ()))}))
  except ValueError as error:
    _mistake(str(error))
  names = [a.split('=', 1)[1] for a in argv if a.startswith('--config.model.name=')]
  model_defaults = models.defaults(names[-1] if names else loaded.model.get('name', ''))
  if names and names[-1] != loaded.model.get('name'):
    given = {a[len('--config.model.'):].partition('=')[0] for a in argv
             if a.startswith('--config.model.')}
    family = lambda name: models.MIXTURES.get(name, name)
    related = family(names[-1]) == family(loaded.model.get('name'))
    _OTHER_MODEL_KEYS[:] = [k for k in loaded.model if k != 'name' and k not in given
                            and (k not in model_defaults or not related)]
  kept = []
  for arg in argv:
    if arg.startswith('--config.'):
      key, _, text = arg[len('--config.'):].partition('=')
      model_key = key[len('model.'):] if key.startswith('model.') else None
      if key not in keys and model_key in model_defaults:
        try:
          _MODEL_KEYS[model_key] = _model_value(text, model_defaults[model_key])
        except (ValueError, SyntaxError):
          _mistake(f'--config.{key}={text}: not a value of the type of its default '
                   f'{model_defaults[model_key]!r}')
        continue
      if key not in keys:
        candidates = keys + [f'model.{k}' for k in model_defaults]
        close = difflib.get_close_matches(key, candidates, 1)
        hint = f'; did you mean --config.{close[0]}?' if close else ''
        _mistake(f'--config.{key}: {path} has no key {key!r}{hint}')
    kept.append(arg)
  resolved = f'--config={path}' + (f':{variant}' if variant else '')
  return [resolved if a.startswith('--config=') else a for a in kept]


def _parse(argv: list[str]):
  argv = argv[:1] + check_arguments(argv[1:])
  sys.argv[:] = argv  # config_flags reads its overrides from sys.argv too
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, TypeError, ValueError) as error:
    _mistake(str(error).splitlines()[0] if str(error) else type(error).__name__)


def main(argv):
  if len(argv) > 1:
    _mistake(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # Orbax and JAX log every checkpoint at INFO.
  # The ~140,000 objects the imports made live as long as the process: kept out of the garbage
  # collector's full passes (one took 54 ms of the demo's first arrival).
  gc.freeze()
  try:
    config = _CONFIG.value
    with config.unlocked():
      for key in _OTHER_MODEL_KEYS:
        del config.model[key]
      for key, value in _MODEL_KEYS.items():
        config.model[key] = value
    config = learners.with_defaults(config)
    with config.unlocked():  # (a shell leaves the ~ of --config.data.path=~/x as it is)
      for key in ('path', 'tfds_data_dir', 'cache_dir', 'tokenizer'):
        if isinstance(config.data.get(key), str):
          config.data[key] = os.path.expanduser(config.data[key])
    workdir = os.path.expanduser(_WORKDIR.value or '')
    backend.configure(config.backend)  # XLA flags are read when the backend starts
    multihost = _MULTIHOST.value or _COORDINATOR.value
    if not multihost and (_NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None):
      _mistake('--num_processes and --process_id need --coordinator_address (process 0\'s '
               'HOST:PORT), or --multihost where JAX finds all three itself (TPU, SLURM)')
    if not _DRY_RUN.value and not workdir:
      _mistake('--workdir is required (a directory for the run\'s outputs and checkpoints)')
    if multihost:
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _DRY_RUN.value:  # (every process loads the data: a dry run prepares each host's)
      if workdir:  # what the run would refuse, without touching it
        workdirs.check(config, workdir)
      plan = run.plan(config)
      if jax.process_index() == 0:
        print(json.dumps({'config': json.loads(config.to_json_best_effort()), 'plan': plan},
                         indent=2))
      return
    run.run(config, workdir)
  except run.Interrupted as stop:  # said on the console; the usual status of that signal
    sys.exit(128 + signal.Signals[stop.signal_name].value)
  except USER_ERRORS as error:
    if _VERBOSE.value:
      raise
    _mistake(f'{error} (--verbose for the traceback)')
  except OSError as error:
    where = error.filename or _WORKDIR.value
    said = {errno.ENOSPC: f'no space left on the device of {where!r}: free some',
            errno.EACCES: f'no permission to use {where!r}: grant it',
            errno.EROFS: f'{where!r} is on a read-only file system'}
    if _VERBOSE.value or error.errno not in said:
      raise
    in_workdir = bool(where and _WORKDIR.value) and os.path.abspath(where).startswith(
        os.path.abspath(_WORKDIR.value))
    _mistake(f'{said[error.errno]}' + (', or choose another --workdir' if in_workdir and
                                       error.errno != errno.ENOSPC else '') +
             ', and run the same command to resume from the last checkpoint (--verbose for '
             'the traceback)')


def _exit_past_stuck_threads(main_fn):
  """`main_fn`, but a process that fails while threads of its own are still running exits
  without waiting for them: a checkpoint write that failed before its directory existed leaves
  Orbax's threads waiting 20 minutes for a signal that never comes (their error is raised
  already, and everything the run keeps is closed by then)."""
  def wrapped(argv):
    try:
      return main_fn(argv)
    except BaseException as error:
      stuck = [t for t in threading.enumerate()
               if t.is_alive() and not t.daemon and t is not threading.main_thread()]
      if not stuck:
        raise
      if not isinstance(error, SystemExit):
        traceback.print_exc()
      code = error.code if isinstance(error, SystemExit) else 1
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code if isinstance(code, int) else 1)
  return wrapped


_FLAGS = (_CONFIG, _WORKDIR, _DRY_RUN, _VERBOSE, _MULTIHOST, _COORDINATOR, _NUM_PROCESSES,
          _PROCESS_ID)


def cli():
  """The `alma-jax` console script. absl's --help describes the main module (the script that
  pip wrote, with no docstring and no flags): this module's usage and flags are made its."""
  script = sys.modules['__main__']
  if script.__doc__ is None:
    script.__doc__ = __doc__
  for holder in _FLAGS:
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])
  app.run(_exit_past_stuck_threads(main), flags_parser=_parse)


if __name__ == '__main__':
  cli()
