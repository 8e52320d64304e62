import glob
import json
import os
import subprocess
import sys

import pytest

from alma_jax import config as alma_config, main
from conftest import REPO

load_config_file = alma_config.load


CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))


def validate(c):
  alma_config.validate(c)


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
@pytest.mark.parametrize('variant', ['', 'tiny'])
def test_every_config_file_loads_and_validates(path, variant):
  validate(load_config_file(f'{path}:{variant}'))


@pytest.mark.parametrize('variants, learner, model, grow_every', [
    ('gmoe,moe', 'finetune', 'moe_vgg', 1), ('moe,gmoe', 'gmoe', 'moe_vgg', 2),
    ('firefly,moe', 'finetune', 'moe_vgg', 1), ('moe,tiny', 'finetune', 'moe_vgg', 1)])
def test_growing_variants_combine_the_last_one_winning(variants, learner, model, grow_every):
  """(gmoe,moe named model 'moe_moe_vgg'; firefly,moe left finetune a grow_every it ignores)"""
  c = load_config_file(os.path.join(REPO, 'configs', f'fashion_mnist_conv.py:{variants}'))
  assert (c.learner.name, c.model.name, c.learner.grow_every) == (learner, model, grow_every)
  validate(c)


def test_config_files_exist():
  names = {os.path.basename(p) for p in CONFIG_FILES}
  assert {'mnist.py', 'fashion_mnist.py'} <= names


@pytest.mark.parametrize('key,value,message', [
    ('learner.name', 'magic', 'config.learner.name'),
    ('stream.replay', 'sometimes', 'config.stream.replay'),
    ('stream.waiting_time', 0, 'config.stream.waiting_time'),
    ('stream.waiting_time', 11, 'config.stream.waiting_time'),
    ('stream.replay_fraction', 1.5, 'config.stream.replay_fraction'),
    ('stream.num_megabatches', -1, 'config.stream.num_megabatches'),
    ('train.batch_size', -128, 'config.train.batch_size'),
    ('model.hidden', 0, 'config.model.hidden'),
    ('model.name', 'giant', 'config.model.name'),
    ('data.max_train_examples', -5, 'config.data.max_train_examples'),
    ('optimizer.learning_rate', float('nan'), 'config.optimizer.learning_rate'),
    ('optimizer.learning_rate', float('inf'), 'config.optimizer.learning_rate'),
    ('optimizer.momentum', float('nan'), 'config.optimizer.momentum'),
    ('optimizer.weight_decay', -0.1, 'config.optimizer.weight_decay'),
    ('train.patience_delta', float('nan'), 'config.train.patience_delta'),
    ('data.std', (0.0,), 'config.data.std'),
    ('data.num_classes', 0, 'config.data.num_classes'),
    ('stream.permutation_seed', -1, 'config.stream.permutation_seed'),
    ('learner.name', 'moe', "config.learner.name='moe': a fixed mixture of experts is now a model"),
    ('model.num_experts', 3, "config.model.num_experts=3: model 'mlp' has no key"),
    ('optimizer.warmup_fraction', 1.0, 'config.optimizer.warmup_fraction'),
])
def test_bad_values_name_the_key(key, value, message):
  c = load_config_file(os.path.join(REPO, 'configs', 'fashion_mnist.py'))
  section, name = key.split('.')
  c[section][name] = value
  with pytest.raises(ValueError, match=message.replace('.', r'\.')):
    validate(c)


@pytest.mark.parametrize('config_file, model, message', [
    ('fashion_mnist_conv.py', {'blocks': (-3, 1)}, r'blocks=\(-3, 1\): must be a non-empty tuple'),
    ('fashion_mnist_conv.py', {'blocks': ()}, r'blocks=\(\): must be a non-empty tuple'),
    ('fashion_mnist_conv.py', {'name': 'moe_vgg', 'blocks': (0, 1)}, r'blocks=\(0, 1\): must be'),
    ('fashion_mnist_conv.py', {'blocks': (1.5, 1)}, r'blocks=\(1\.5, 1\): must be a tuple of whole'),
    ('fashion_mnist_conv.py', {'blocks': 3}, r'blocks=3: must be a tuple of whole numbers'),
    ('lm.py', {'attention': 'flash'}, r"attention='flash': must be 'auto'"),
    ('fashion_mnist.py', {'name': 'moe_mlp', 'num_experts': 2.7},
     r'num_experts=2\.7: must be a whole number >= 1'),
    ('lm.py', {'dtype': 'float17'}, r"dtype='float17': must name a floating-point type"),
    ('lm.py', {'dtype': 'int32'}, r"dtype='int32': must name a floating-point type"),
    ('lm.py', {'width': 100, 'heads': 3}, r'width=100: must be a multiple of model\.heads=3'),
])
def test_bad_model_values_are_refused_before_the_model_is_built(config_file, model, message):
  """(A dtype or head count failed when the model was first traced, after the data was read;
  VGG blocks of no or negative convolutions built another model without a word.)"""
  c = load_config_file(os.path.join(REPO, 'configs', config_file))
  c.model.update(model)
  with pytest.raises(ValueError, match=r'config\.model\.' + message):
    validate(c)


def test_a_registered_model_checks_only_its_own_keys(monkeypatch):
  """The transformer's and the VGG's own rules (heads, dtype, blocks) are theirs: a user's model
  with keys of the same names, or tuples of other meanings, is not held to them."""
  import flax.linen as nn
  from alma_jax import models

  class Mine(nn.Module):
    num_classes: int = 10
    heads: int = 3
    dtype: str = 'int8'
    padding: tuple = (1, 1)

  monkeypatch.setitem(models._MODELS, 'mine', Mine)
  import ml_collections
  models.check(ml_collections.ConfigDict({'name': 'mine', 'padding': (0, 0)}))
  with pytest.raises(ValueError, match=r'padding=\(0\.5,\): must be a tuple of whole numbers'):
    models.check(ml_collections.ConfigDict({'name': 'mine', 'padding': (0.5,)}))


def test_a_transformer_left_at_its_default_context_is_checked_against_it():
  c = load_config_file(os.path.join(REPO, 'configs', 'lm.py'))
  del c.model['context']  # (a model key the file leaves to the model's default: 128)
  c.data.sequence_length = 129
  with pytest.raises(ValueError, match=r'sequence_length=129: longer .* \(model\.context=128\)'):
    validate(c)


def test_model_keys_the_file_lacks_are_read_as_given_not_coerced(monkeypatch, capsys):
  """A fraction for a whole-number key was truncated, a misspelled bool read as False."""
  monkeypatch.chdir(REPO)
  main.check_arguments(['--config=configs/fashion_mnist.py', '--config.model.name=moe_mlp',
                        '--config.model.num_experts=2.7'])
  assert main._MODEL_KEYS == {'num_experts': 2.7}  # (then refused by the check above)
  main.check_arguments(['--config=configs/fashion_mnist.py', '--config.model.name=vgg',
                        '--config.model.blocks=[1, 2]'])
  assert main._MODEL_KEYS == {'blocks': (1, 2)}
  main.check_arguments(['--config=configs/fashion_mnist.py', '--config.model.name=transformer',
                        '--config.model.remat=True'])
  assert main._MODEL_KEYS == {'remat': True}
  with pytest.raises(SystemExit) as exit_:
    main.check_arguments(['--config=configs/fashion_mnist.py', '--config.model.name=transformer',
                          '--config.model.remat=ture'])
  assert exit_.value.code == 2
  assert "--config.model.remat=ture: not a value of the type of its default" in capsys.readouterr().err


@pytest.mark.parametrize('updates, message', [
    ({'seed': -1}, r'config\.seed=-1: must be in \[0, 2\*\*32\)'),
    ({'seed': 2 ** 32}, r'config\.seed=4294967296'),
    ({'stream.replay': 'reservoir', 'stream.reservoir_size': 1},
     r'config\.stream\.reservoir_size=1: leaves no room for training examples'),
    ({'optimizer.round_schedule': True, 'optimizer.decay_steps': 1600},
     r'config\.optimizer\.decay_steps=1600: counts steps, which optimizer\.round_schedule'),
])
def test_values_that_fail_later_in_a_run_are_refused_before_it(updates, message):
  """(a negative seed failed at the first replay draw; a reservoir of 1 replayed nothing)"""
  c = load_config_file(os.path.join(REPO, 'configs', 'fashion_mnist.py'))
  for key, value in updates.items():
    *section, name = key.split('.')
    (c[section[0]] if section else c)[name] = value
  with pytest.raises(ValueError, match=message):
    validate(c)
  c.update(seed=2 ** 32 - 1)
  c.stream.reservoir_size = 2
  c.optimizer.decay_steps = 0
  validate(c)


@pytest.mark.parametrize('learner, kept', [('finetune', True), ('k_ensemble', True),
                                           ('agg_ensemble', True), ('from_scratch', False),
                                           ('gens', False), ('bagging', False),
                                           ('boosting', False)])
def test_only_warm_started_learners_may_keep_their_optimizer(learner, kept):
  """`learner.reset_optimizer=False` is refused where every round trains new members (which
  would store optimizer states that match no member), not silently ignored."""
  c = load_config_file(os.path.join(REPO, 'configs', 'fashion_mnist.py'))
  c.learner.update(name=learner, reset_optimizer=False)
  if kept:
    validate(c)
  else:
    with pytest.raises(ValueError, match=rf'config\.learner\.reset_optimizer=False: {learner} '
                                         r'trains new members .* finetune'):
      validate(c)


@pytest.mark.parametrize('learner, key, value', [
    ('bagging', 'prediction', 'vote'), ('finetune', 'num_members', 5),
    ('k_ensemble', 'new_member', 'fresh'), ('gens', 'grow_every', 2),
    ('gmoe', 'new_neurons', 8), ('firefly', 'growth', 'random')])
def test_an_option_the_learner_does_not_read_is_refused(learner, key, value):
  """(bagging with prediction='vote' averaged logits all the same, silently)"""
  c = load_config_file(os.path.join(REPO, 'configs', 'fashion_mnist.py'))
  c.learner.name = learner
  c.model.name = 'moe_mlp' if learner == 'gmoe' else 'mlp'
  validate(c)
  c.learner[key] = value
  with pytest.raises(ValueError, match=rf'config\.learner\.{key}=.*: {learner} does not use it'):
    validate(c)
  # A run saved with such a value (0.9.7 accepted it) resumes: nothing it changed.
  saved = {'learner': {'name': learner, key: value}}
  assert alma_config.protocol_differences(saved, {'learner': {'name': learner}}) == []
  assert alma_config.protocol_differences({'learner': {'name': 'gens', 'prediction': 'vote'}},
                                          {'learner': {'name': 'gens'}}) == ['learner.prediction']


def run_main(*args, timeout=120):
  return subprocess.run([sys.executable, '-m', 'alma_jax.main', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize('args,line', [
    (('--config=configs/fashion_mnist.py', '--config.stream.waitng_time=3'),
     "error: --config.stream.waitng_time: configs/fashion_mnist.py has no key "
     "'stream.waitng_time'; did you mean --config.stream.waiting_time?"),
    (('--config=configs/nope.py',), "error: --config=configs/nope.py: no config file"),
    (('--config=configs/fashion_mnist.py:huge',), "unknown variant 'huge'"),
    (('--config=configs/fashion_mnist.py', '--config.model.width=8'),
     "has no key 'model.width'; did you mean --config.model.hidden?"),
])
def test_a_config_mistake_is_one_line_naming_it_and_status_2(args, line, capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(SystemExit) as exit_:
    main.check_arguments(list(args))
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.count('\n') == 1 and line in err


def test_a_file_that_is_not_a_config_is_one_line_naming_it(tmp_path, capsys):
  """The resume message names a run's config.json: passing it as --config used to end in a
  traceback, as did a file without get_config or one returning a plain dict."""
  for name, text, line in [
      ('config.json', '{"seed": 0}', 'config.json is not a config file'),
      ('empty.py', 'seed = 0\n', 'empty.py defines no get_config(variant)'),
      ('plain.py', 'def get_config(variant=""):\n  return {"seed": 0}\n',
       'plain.py: get_config returned a dict, not an ml_collections.ConfigDict')]:
    (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as exit_:
      main.check_arguments([f'--config={tmp_path / name}'])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count('\n') == 1 and line in err, err


def test_a_dry_run_refuses_the_workdir_the_run_would_refuse(tmp_path):
  (tmp_path / 'theirs').mkdir()
  (tmp_path / 'theirs' / 'config.json').write_text('{"lr": 0.1}')
  out = run_main('--config=configs/fashion_mnist.py:tiny', '--dry_run',
                 f'--workdir={tmp_path / "theirs"}')
  assert out.returncode == 2 and out.stderr.count('\n') == 1, out.stderr
  assert "is not an alma_jax run's config" in out.stderr
  assert (tmp_path / 'theirs' / 'config.json').read_text() == '{"lr": 0.1}'


def test_a_tilde_the_shell_left_in_a_path_is_the_home_directory(tmp_path):
  """A shell expands ~ at the start of a word only: --workdir=~/run reaches the program as is."""
  out = subprocess.run([sys.executable, '-m', 'alma_jax.main', '--config=configs/fashion_mnist.py',
                        '--config.data.path=~/nowhere', '--dry_run'], cwd=REPO,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'HOME': str(tmp_path)})
  assert out.returncode == 2 and repr(str(tmp_path / 'nowhere')) in out.stderr, out.stderr


@pytest.mark.parametrize('args,line', [
    (('--config.stream.waiting_time=20',),
     'error: config.stream.waiting_time=20: the waiting time must be between 1 and'),
    (('--config.stream.waiting_time=abc',), "error: flag --config.stream.waiting_time=abc"),
    (('--config.data.path=/nowhere',), "error: idx data set not found"),
    (('--num_processes=2', '--process_id=1'),  # (each would run alone on one workdir)
     'error: --num_processes and --process_id need --coordinator_address'),
])
def test_a_mistake_is_one_line_and_status_2_before_any_work(tmp_path, args, line):
  out = run_main('--config=configs/fashion_mnist.py', *args, f'--workdir={tmp_path}/run')
  assert out.returncode == 2, out.stderr
  assert out.stderr.count('\n') == 1 and line in out.stderr
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_a_diverging_run_ends_in_one_line_and_status_2(tmp_path):
  out = run_main('--config=configs/fashion_mnist.py:tiny', f'--workdir={tmp_path}/run',
                 '--config.optimizer.name=sgd', '--config.optimizer.learning_rate=1e30')
  assert out.returncode == 2 and out.stderr.count('\n') == 1, out.stderr
  assert 'error: test loss nan after arrival 1: training diverged' in out.stderr


def test_verbose_shows_the_traceback(tmp_path):
  out = run_main('--config=configs/fashion_mnist.py', f'--workdir={tmp_path}/run',
                 '--config.stream.waiting_time=20', '--verbose')
  assert out.returncode != 0 and 'Traceback' in out.stderr


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
  out = run_main('--config=configs/fashion_mnist.py:tiny', '--dry_run')
  assert out.returncode == 0, out.stderr
  printed = json.loads(out.stdout)
  assert printed['config']['stream']['num_megabatches'] == 4
  plan = printed['plan']
  assert plan['rounds_after_arrivals'] == [1, 2, 3, 4] and plan['params_at_start'] == 55_050
  assert sum(plan['train_examples_per_megabatch']) + sum(
      plan['validation_examples_per_megabatch']) == 2000
  assert plan['train_step_flops'] > 0


def test_a_key_of_the_named_model_can_be_set_though_the_config_file_lacks_it():
  out = run_main('--config=configs/fashion_mnist.py:tiny', '--config.model.name=moe_mlp',
                 '--config.model.num_experts=4', '--dry_run')
  assert out.returncode == 0, out.stderr
  printed = json.loads(out.stdout)
  assert printed['config']['model']['num_experts'] == 4
  # 4 experts of 784x64 and of 64x64 (with biases), their gates, the head
  experts = 4 * (784 * 64 + 64) + 4 * (64 * 64 + 64) + (784 * 4 + 4) + (64 * 4 + 4) + 650
  assert printed['plan']['params_at_start'] == experts


def test_a_config_files_model_can_be_replaced_on_the_command_line(monkeypatch):
  """The tiny VGG config with a ResNet-18: the file's VGG keys go (its `width` too: a ResNet's
  default is not a VGG's), the ResNet's own can be set; a mixture of the file's model keeps the
  file's keys it shares;
  a key of the file's model that the command line sets again is still refused, naming it. The
  MLP config's 28x28 images are too small for a VGG: one line says how to pad them."""
  monkeypatch.chdir(REPO)
  for config, model, dropped in (('fashion_mnist_conv.py:tiny', 'resnet18', {'width', 'blocks'}),
                                 ('fashion_mnist.py', 'moe_mlp', set()),
                                 ('fashion_mnist.py', 'vgg', {'hidden', 'num_layers'})):
    main.check_arguments([f'--config=configs/{config}', f'--config.model.name={model}'])
    assert set(main._OTHER_MODEL_KEYS) == dropped, model
  out = run_main('--config=configs/fashion_mnist_conv.py:tiny', '--config.model.name=resnet18',
                 '--config.model.width=4', '--dry_run')
  assert out.returncode == 0, out.stderr
  printed = json.loads(out.stdout)
  assert printed['config']['model'] == {'name': 'resnet18', 'width': 4}
  assert printed['plan']['params_at_start'] > 0
  out = run_main('--config=configs/fashion_mnist_conv.py:tiny', '--config.model.name=resnet18',
                 '--config.model.blocks=(1,)', '--dry_run')
  assert out.returncode == 2
  assert "config.model.blocks=(1,): model 'resnet18' has no key" in out.stderr
  out = run_main('--config=configs/fashion_mnist.py:tiny', '--config.model.name=vgg', '--dry_run')
  assert out.returncode == 2 and out.stderr.count('\n') == 1
  assert 'images of 28x28 are too small (set config.data.pad_to=32' in out.stderr
  out = run_main('--config=configs/fashion_mnist.py:tiny', '--config.model.name=moe_vgg',
                 '--dry_run')
  assert out.returncode == 2 and 'images of 28x28 are too small' in out.stderr


def test_a_nan_saved_and_given_again_is_no_protocol_change():
  nan = float('nan')
  given = lambda rate: {'optimizer': {'learning_rate': rate}}
  assert alma_config.protocol_differences(given(nan), given(nan)) == []
  assert alma_config.protocol_differences(given(nan), given(1.0)) == ['optimizer.learning_rate']


def test_configs_resolve_from_any_directory(tmp_path):
  """`--config=configs/...` names the repository's config when run elsewhere."""
  out = subprocess.run([sys.executable, '-m', 'alma_jax.main', '--config=configs/lm.py:tiny',
                        '--dry_run'], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'PYTHONPATH': REPO})
  assert out.returncode == 0, out.stderr
  assert json.loads(out.stdout)['config']['model']['name'] == 'transformer'


@pytest.mark.parametrize('code, said', [('ENOSPC', 'no space left on the device of'),
                                         ('EACCES', 'no permission to use'),
                                         ('EROFS', 'is on a read-only file system')])
def test_a_full_or_unwritable_disk_is_one_line(tmp_path, code, said):
  code = ('import errno, sys; from alma_jax import main, run\n'
          'def full(config, workdir):\n'
          f'  raise OSError(errno.{code}, "injected", workdir + "/checkpoints/3")\n'
          'run.run = full\n'
          f'sys.argv = ["alma-jax", "--config=configs/fashion_mnist.py:tiny", '
          f'"--workdir={tmp_path}"]\n'
          'main.cli()\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 2 and out.stderr.count('\n') == 1, out.stderr
  assert said in out.stderr and str(tmp_path) in out.stderr


def test_the_console_script_help_shows_the_usage_and_flags():
  """As pip's `alma-jax` script calls it: a main module with no docstring and no flags (its
  --help showed only "USAGE: alma-jax [flags]")."""
  code = ('import sys; from alma_jax import main\n'
          'sys.argv = ["/somewhere/bin/alma-jax", "--help"]\n'
          'main.cli()\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  shown = out.stdout + out.stderr
  assert 'Runs the ALMA protocol' in shown
  assert all(f'--{flag}' in shown for flag in ('config', 'workdir', 'dry_run', 'multihost'))


def test_a_mixture_run_saved_by_0_4_reads_back_as_a_mixture_model():
  """0.4.0 saved mixtures as learners ('moe', 'gmoe' over 'mlp' or 'vgg', learner.num_experts)."""
  saved = alma_config.base().to_dict()
  saved['learner'] = {**saved['learner'], 'name': 'moe', 'num_experts': 3}
  c = alma_config.from_saved(saved)
  assert (c.learner.name, c.model.name, c.model.num_experts) == ('finetune', 'moe_mlp', 3)
  assert 'num_experts' not in c.learner
  saved['learner']['name'] = 'gmoe'
  saved['model'] = {'name': 'vgg', 'width': 8}
  c = alma_config.from_saved(saved)
  assert (c.learner.name, c.model.name, c.model.width) == ('gmoe', 'moe_vgg', 8)
  saved['learner'] = {**saved['learner'], 'name': 'gens'}  # other learners only lose the key
  c = alma_config.from_saved(saved)
  assert (c.learner.name, c.model.name) == ('gens', 'vgg') and 'num_experts' not in c.learner
