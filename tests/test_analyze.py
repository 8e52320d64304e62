"""Reading runs back: exact per-arrival errors from checkpoints, the CLI's table and plots."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from alma_jax import analyze, checkpoint, config as alma_config, data, run
from conftest import REPO, checkpoint_data_files, flip_a_bit


@pytest.fixture(scope='module')
def runs(idx_dir, tmp_path_factory):
  """A finetune run and a growing ensemble's (gens) run of the tiny protocol."""
  from conftest import tiny_config
  root = tmp_path_factory.mktemp('runs')
  out = {}
  for learner in ('finetune', 'gens'):
    config = tiny_config(idx_dir)
    config.learner.name = learner
    config.stream.num_megabatches = 4
    config.train.update(max_epochs=3, patience=2)
    run.run(config, str(root / learner))
    out[learner] = str(root / learner)
  return out


@pytest.mark.parametrize('learner', ['finetune', 'gens'])
def test_analysis_reproduces_the_logged_errors_at_every_arrival(runs, learner):
  r = analyze.Run(runs[learner])
  assert r.arrivals() == [1, 2, 3, 4]  # every arrival is kept
  logged = [(row['test_error'], row['test_loss']) for row in r.rows()]
  again = [r.evaluate(t) for t in r.arrivals()]
  assert [a['error'] for a in again] == [e for e, _ in logged]
  np.testing.assert_allclose([a['loss'] for a in again], [l for _, l in logged], rtol=1e-6)
  if learner == 'gens':  # the ensemble grew by one member per round
    assert [r.learner.num_members(r.predictor(t)) for t in r.arrivals()] == [1, 2, 3, 4]


def test_evaluate_on_other_data(runs):
  r = analyze.Run(runs['finetune'])
  dataset = data.load(r.config.data)
  whole = r.evaluate(4, dataset.test_images, dataset.test_labels)
  assert whole['error'] == r.rows()[-1]['test_error']
  part = r.evaluate(4, dataset.test_images[:100], dataset.test_labels[:100])
  state = r.predictor(4)
  _, predicted = r.learner.ensemble(state.variables, state.member_weights,
                                    dataset.test_images[:100])
  assert part['error'] == pytest.approx(np.mean(np.asarray(predicted) != dataset.test_labels[:100]))
  images, labels = dataset.test_images[:100], dataset.test_labels[:100]
  assert r.evaluate(4, images.astype(np.int64), labels) == part  # integers of another type
  for given, message in (((images / 255.0, labels), 'give them raw'),
                         ((images, labels[:50]), '100 examples and 50 labels'),
                         ((images, labels + 10), 'labels from 10 to'),
                         ((images.astype(np.int64) + 200, labels), 'values from 200 to')):
    with pytest.raises(ValueError, match=message):
      r.evaluate(4, *given)


def test_a_directory_that_is_not_a_run_is_named(tmp_path, capsys):
  with pytest.raises(analyze.NotARunError, match='not an alma_jax run'):
    analyze.Run(str(tmp_path))
  (tmp_path / 'theirs').mkdir()
  (tmp_path / 'theirs' / 'config.json').write_text('[1, 2]')  # (a traceback, before)
  for directory, message in ((tmp_path, 'not an alma_jax run'),
                             (tmp_path / 'missing', 'no such directory'),
                             (tmp_path / 'theirs', "its config.json is not a run's config")):
    with pytest.raises(SystemExit) as exit_:
      analyze.cli([str(directory)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count('\n') == 1 and message in err


def test_a_partial_run_is_marked_and_never_ranked_with_finished_ones(runs, tmp_path,
                                                                     monkeypatch):
  read = []  # the parts of the run state each checkpoint read asked for
  restore = checkpoint.Checkpointer.restore
  monkeypatch.setattr(checkpoint.Checkpointer, 'restore', lambda self, step, parts=None: (
      read.append(parts) or restore(self, step, parts)))
  partial = tmp_path / 'partial'
  shutil.copytree(runs['finetune'], partial)
  os.remove(partial / run.SUMMARY_FILE)
  for step in os.listdir(partial / 'checkpoints'):
    if int(step) > 2:
      shutil.rmtree(partial / 'checkpoints' / step)
  finished, stopped = analyze.Run(runs['finetune']), analyze.Run(str(partial))
  assert finished.finished and not stopped.finished
  total = stopped.summary()['num_megabatches']
  assert f'| 2/{total} (partial) |' in analyze.table([finished, stopped], ['a', 'b'])
  # Its rows and numbers are those of the arrivals checkpointed (its metrics.jsonl holds all
  # 5: a run killed before committing a row's checkpoint redoes that arrival on resume).
  errors = [row['test_error'] for row in stopped.rows()]
  assert len(errors) == 2 and stopped.summary()['cer_per_t'] == pytest.approx(sum(errors) / 2)
  assert read and set(read) == {('history',)}  # its numbers come without reading the learner
  assert stopped.history(2)['test_error'].tolist()[:2] == errors
  analyze.plot([finished, stopped], ['a', 'b'], str(tmp_path / 'plots'))  # draws; b left out
  (tmp_path / 'empty').mkdir()
  shutil.copy(partial / run.CONFIG_FILE, tmp_path / 'empty')
  empty = analyze.Run(str(tmp_path / 'empty'))
  with pytest.raises(analyze.NotARunError, match='holds no checkpoint: the run has yet to finish '
                     'its first arrival'):
    empty.summary()
  assert empty.arrivals() == [] and os.listdir(tmp_path / 'empty') == [run.CONFIG_FILE]
  # A seed that has no checkpoint yet, and a run that has none, are left out of the plots.
  drawn = analyze.plot([[finished, empty], empty], ['a', 'b'], str(tmp_path / 'plots2'))
  assert len(drawn) == 3


def test_the_cli_leaves_out_a_run_not_started_and_says_so(runs, tmp_path, capsys):
  (tmp_path / 'started').mkdir()
  shutil.copy(os.path.join(runs['finetune'], run.CONFIG_FILE), tmp_path / 'started')
  analyze.cli([runs['finetune'], str(tmp_path / 'started'), f'--out={tmp_path / "out"}',
               '--labels=done,started'])
  out, err = capsys.readouterr()
  assert '| done |' in out and 'started' not in out
  assert err == 'left out, no checkpoint yet: started\n'
  assert os.listdir(tmp_path / 'started') == [run.CONFIG_FILE]  # nothing written into it
  with pytest.raises(SystemExit) as exit_:
    analyze.cli([str(tmp_path / 'started')])
  assert exit_.value.code == 2 and ('none of the runs has a checkpoint: started (the run has yet '
                                    'to finish its first arrival)') in capsys.readouterr().err


def test_damaged_files_of_a_run_are_named_in_one_line_and_nothing_is_moved(runs, tmp_path,
                                                                          capsys):
  def cli_error(*args):
    with pytest.raises(SystemExit) as exit_:
      analyze.cli([*args, f'--out={tmp_path / "out"}'])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count('\n') == 1, err
    return err

  unfinished = tmp_path / 'unfinished'  # (its numbers are read from its latest checkpoint)
  shutil.copytree(runs['finetune'], unfinished)
  os.remove(unfinished / run.SUMMARY_FILE)
  _damage_arrays(unfinished / 'checkpoints' / '4')
  err = cli_error(str(unfinished))
  assert f'{unfinished}: checkpoint 4: ' in err and 'sets it aside' in err
  assert analyze.Run(str(unfinished)).arrivals() == [1, 2, 3, 4]  # analysis moves nothing
  rows = tmp_path / 'rows'
  shutil.copytree(runs['finetune'], rows)
  with open(rows / run.METRICS_FILE, 'r+') as f:
    f.truncate(len(f.readline()) + 10)
  assert f'{rows / run.METRICS_FILE} is damaged' in cli_error(str(rows))
  config = tmp_path / 'config'
  shutil.copytree(runs['finetune'], config)
  with open(config / run.CONFIG_FILE, 'r+') as f:
    f.truncate(100)
  assert f'{config / run.CONFIG_FILE} is not a readable run config' in cli_error(str(config))
  (tmp_path / 'notes').write_text('mine')
  with pytest.raises(SystemExit):
    analyze.cli([runs['finetune'], f'--out={tmp_path / "notes"}'])
  assert 'a file, not a folder' in capsys.readouterr().err
  assert (tmp_path / 'notes').read_text() == 'mine'


def _damage_arrays(checkpoint_dir) -> None:
  """Flips a bit in the middle of every array file of a checkpoint."""
  for path in checkpoint_data_files(checkpoint_dir):
    flip_a_bit(path)


def test_a_damaged_checkpoint_costs_the_cli_one_line_of_stderr(runs, tmp_path):
  """Reads still in flight when a damaged checkpoint's read fails each reported 'Event loop is
  closed' as a traceback on stderr (dozens), around the one-line error, in the CLI's own
  process (in-process, pytest catches them)."""
  damaged = tmp_path / 'damaged'
  shutil.copytree(runs['finetune'], damaged)
  os.remove(damaged / run.SUMMARY_FILE)
  _damage_arrays(damaged / 'checkpoints' / '4')
  out = subprocess.run([sys.executable, '-m', 'alma_jax.analyze', str(damaged),
                        f'--out={tmp_path / "out"}'], capture_output=True, text=True, cwd=REPO,
                       timeout=120)
  assert out.returncode == 2
  assert out.stderr.count('\n') == 1 and 'checkpoint 4: ' in out.stderr, out.stderr[-3000:]


def test_a_run_whose_flops_were_not_counted_is_named_not_plotted(runs, tmp_path, monkeypatch):
  a, b = analyze.Run(runs['finetune']), analyze.Run(runs['gens'])
  summary = b.summary()
  monkeypatch.setattr(b, 'summary', lambda: {**summary, 'train_flops': float('nan')})
  texts = []
  import matplotlib.axes
  text = matplotlib.axes.Axes.text
  monkeypatch.setattr(matplotlib.axes.Axes, 'text',
                      lambda self, x, y, s, *a, **k: texts.append(s) or text(self, x, y, s, *a, **k))
  analyze.plot([a, b], ['a', 'b'], str(tmp_path / 'plots'))
  assert 'not shown, FLOPs not counted: b' in texts


def test_seeds_of_a_setting_are_drawn_as_their_mean(runs, tmp_path, monkeypatch):
  a, b = analyze.Run(runs['finetune']), analyze.Run(runs['gens'])
  t, mean, std = analyze._curve([a, b], 'test_error')
  errors = [[row['test_error'] for row in r.rows()] for r in (a, b)]
  np.testing.assert_allclose(mean, np.mean(errors, 0))
  np.testing.assert_allclose(std, np.std(errors, 0))
  assert t.tolist() == list(range(1, len(mean) + 1))
  assert analyze._first_round([a, b]) == 1
  paths = analyze.plot([[a, b], a], ['both', 'one'], str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == ['anytime.png', 'cer_vs_flops.png',
                                                         'params.png']


def test_pareto_front():
  costs = np.array([1.0, 2.0, 3.0, 4.0, 2.5])
  values = np.array([0.5, 0.4, 0.45, 0.2, 0.3])
  assert analyze.pareto_front(costs, values).tolist() == [0, 1, 4, 3]


def test_cli_prints_a_table_and_writes_plots(runs, tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'alma_jax.analyze', runs['finetune'], runs['gens'],
       f'--out={tmp_path}', '--labels=ft,gEns'],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=True).stdout
  rows = [line for line in out.splitlines() if line.startswith('| ft') or
          line.startswith('| gEns')]
  assert len(rows) == 2 and '| gens |' in rows[1]
  summary = json.load(open(os.path.join(runs['gens'], run.SUMMARY_FILE)))
  assert f"{summary['final_error']:.4f}" in rows[1]
  assert f"| {summary['cumulative_loss_per_t']:.4f} |" in rows[1]  # the loss area's column
  with open(tmp_path / 'table.csv') as f:
    assert list(csv.reader(f))[2][:3] == ['gEns', 'gens', f"{summary['arrivals']}/{summary['arrivals']}"]
  import matplotlib.image
  for name in ('anytime.png', 'cer_vs_flops.png', 'params.png'):
    image = matplotlib.image.imread(tmp_path / name)
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_the_cli_on_an_unfinished_run_warns_of_nothing_and_says_what_it_replaced(runs,
                                                                                 tmp_path):
  """With no finished run the CER-against-FLOPs plot has nothing to label (it says so on the
  plot): matplotlib warned of an empty legend. An --out that holds earlier outputs is said to
  be replaced, not silently."""
  partial = tmp_path / 'partial'
  shutil.copytree(runs['finetune'], partial)
  for step in ('3', '4'):  # (as a run stopped after arrival 2 leaves it)
    shutil.rmtree(partial / 'checkpoints' / step)
  os.remove(partial / run.SUMMARY_FILE)
  command = [sys.executable, '-W', 'error::UserWarning', '-m', 'alma_jax.analyze', str(partial),
             f'--out={tmp_path / "out"}']
  first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert first.returncode == 0 and 'Warning' not in first.stderr, first.stderr[-2000:]
  assert '2/4 (partial)' in first.stdout and 'wrote ' in first.stdout
  again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
  said = [line.split()[0] for line in again.stdout.splitlines()
          if line.startswith(('wrote ', 'replaced '))]
  assert said == ['replaced'] * 4, again.stdout


def test_a_sweep_point_runs_once_then_is_read_back(idx_dir, tmp_path):
  sys.path.insert(0, os.path.join(REPO, 'experiments'))
  import sweeps
  from conftest import tiny_config
  from test_run import write_config
  config = tiny_config(idx_dir)
  config.stream.num_megabatches = 2
  config_file = write_config(config, tmp_path / 'cfg.py')
  workdir = str(tmp_path / 'point' / 'seed1')
  first = sweeps.run_point(config_file, '', {'stream.waiting_time': 2}, 1, workdir)
  assert first['rounds'] == 1  # w=2 of T=2: one round
  assert json.load(open(os.path.join(workdir, run.CONFIG_FILE)))['seed'] == 1
  mtime = os.path.getmtime(os.path.join(workdir, run.SUMMARY_FILE))
  again = sweeps.run_point(config_file, '', {'stream.waiting_time': 2}, 1, workdir)
  assert again == first and os.path.getmtime(os.path.join(workdir, run.SUMMARY_FILE)) == mtime
  sweeps.write_table(str(tmp_path / 'table.md'), ['w2'], {'w2': [first, again]}, False)
  assert f"| w2 | 2 | {first['final_error']:.4f} ± 0.0000 |" in open(tmp_path / 'table.md').read()


@pytest.mark.parametrize('variant', ['', 'tiny'])
def test_every_sweep_point_has_a_valid_config_full_and_reduced(variant):
  sys.path.insert(0, os.path.join(REPO, 'experiments'))
  import sweeps
  from test_config import validate
  for name, (config_file, grid) in sweeps.SWEEPS.items():
    for point, overrides in grid:
      config = sweeps.point_config(config_file, variant, overrides, seed=2)
      validate(config)
      assert config.seed == 2, (name, point)
  lm_grid = dict(sweeps.SWEEPS['lm_waiting_time'][1])
  w5 = sweeps.point_config(sweeps.LM, variant, lm_grid['w5'], seed=0)
  # (a round of 5 mega-batches decays its learning rate over its own steps)
  assert w5.stream.waiting_time == 5 and w5.optimizer.round_schedule


def test_a_grown_run_written_by_an_earlier_version_is_read_back(tmp_path):
  """tests/data/run_e405b29_gmoe: a gMoE run written by commit e405b29 (before the data task,
  tokens and the current mixture model existed) on the tests' synthetic data set."""
  from conftest import make_idx_dataset
  workdir = tmp_path / 'old'
  shutil.copytree(os.path.join(REPO, 'tests', 'data', 'run_e405b29_gmoe'), workdir)
  saved = json.load(open(workdir / run.CONFIG_FILE))
  saved['data']['path'] = make_idx_dataset(str(tmp_path / 'data'))  # the same data, rebuilt
  (workdir / run.CONFIG_FILE).write_text(json.dumps(saved))
  r = analyze.Run(str(workdir))
  assert r.arrivals() == [1, 2, 3]
  logged = [row['test_error'] for row in r.rows()]
  assert [r.evaluate(t)['error'] for t in r.arrivals()] == logged
  assert r.summary()['params'] == 7482
  assert r.learner.params(r.predictor(3)) == 7482  # the grown expert trees restored
  # Its summary.json has no loss area (added since): the table computes it from the history.
  area = sum(row['test_loss'] for row in r.rows()) / 3
  assert f'| {area:.4f} |' in analyze.table([r], ['old'])
  # Run again (it is finished), with TensorBoard: the history it restores lacks the fields
  # added since (the bytes held), and its rows are written again without them.
  config = alma_config.from_saved(json.load(open(workdir / run.CONFIG_FILE)))
  config.log.tensorboard = True
  assert run.run(config, str(workdir))['arrivals'] == 3
  assert [row['test_error'] for row in analyze.Run(str(workdir)).rows()] == logged
