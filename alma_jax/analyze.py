"""Runs read back from their workdirs: tables, plots, and predictors restored at any arrival.

    run = analyze.Run('runs/demo')
    run.config, run.rows(), run.summary(), run.arrivals()
    tree = run.state(4)                  # the checkpointed run state after arrival 4
    run.history(4)                       # its per-arrival metrics alone (the learner not read)
    run.evaluate(4)                      # its predictor on the test set: {'error', 'loss'}
    run.evaluate(4, images, labels)      # ... or on any data (raw, like the data set's)

The learner is rebuilt from the run's saved config over a mesh of the devices present, and
restores whatever the checkpoint holds (a grown ensemble included), so a run written on 8
devices is read on 1. Command line (markdown table on stdout, PNG plots in --out):

    alma-jax-analyze RUN_DIR... [--out=DIR] [--labels=a,b,...]   (or python -m alma_jax.analyze)
"""
from __future__ import annotations

import argparse
import csv
import functools
import json
import os
import sys

from absl import logging
import ml_collections
import numpy as np

from alma_jax import checkpoint, config as alma_config, data, learners, metrics
from alma_jax import placement, run as alma_run, sharding


class NotARunError(FileNotFoundError):
  """A directory that holds no alma_jax run."""


class Run:
  """One run directory: its config, per-arrival metrics, checkpoints and predictors."""

  def __init__(self, directory: str):
    self.directory = directory
    path = os.path.join(directory, alma_run.CONFIG_FILE)
    if not os.path.isdir(directory):
      raise NotARunError(f'{directory!r}: ' + ('a file, not a run directory'
                                              if os.path.exists(directory)
                                              else 'no such directory'))
    if not os.path.isfile(path):
      raise NotARunError(f'{directory!r} is not an alma_jax run: it holds no '
                         f'{alma_run.CONFIG_FILE}')
    with open(path) as f:
      try:
        saved = json.load(f)
      except ValueError as error:
        raise NotARunError(f'{path} is not a readable run config ({error})') from None
    if not alma_config.is_saved_config(saved):
      raise NotARunError(f'{directory!r} is not an alma_jax run: its {alma_run.CONFIG_FILE} is '
                         f'not a run\'s config')
    # The run's own learners, models and data sources register before its config is read.
    alma_config.import_extensions(ml_collections.ConfigDict({'extensions': saved.get(
        'extensions', ())}))
    self.config = alma_config.from_saved(saved)

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.directory))

  @property
  def language_model(self) -> bool:
    return self.config.data.get('task', 'classification') == 'language_model'

  def rows(self) -> list[dict]:
    """One dict per arrival logged and checkpointed so far (metrics.jsonl; a run killed
    between writing a row and committing its checkpoint redoes that arrival on resume)."""
    path = os.path.join(self.directory, alma_run.METRICS_FILE)
    if not os.path.exists(path):
      return []
    with open(path) as f:
      lines = [line for line in f if line.strip()]
    try:
      rows = [json.loads(line) for line in lines]
    except ValueError as error:
      raise ValueError(f'{path} is damaged ({error}); the checkpoints hold the same rows: run '
                       f'the command that started the run again to rewrite it') from None
    return rows[:max(self.arrivals(), default=0)]

  def summary(self) -> dict:
    """summary.json of a finished run (the keys added since an earlier version wrote it
    computed from its history); for an unfinished one, the same numbers over the arrivals done
    (`arrivals` < `num_megabatches`: its CER/T is not comparable)."""
    path = os.path.join(self.directory, alma_run.SUMMARY_FILE)
    if os.path.exists(path):
      with open(path) as f:
        saved = json.load(f)
      if set(metrics.summary(metrics.empty_history(1))) <= set(saved):
        return saved
      return {**metrics.summary(self.history(self.arrivals()[-1])), **saved}
    if not self.arrivals():
      raise NotARunError(f'{self.directory!r} holds no checkpoint: {self._why_no_checkpoint()}')
    return metrics.summary(self.history(self.arrivals()[-1]))

  @property
  def finished(self) -> bool:
    s = self.summary()
    return s['arrivals'] == s['num_megabatches']

  @functools.cached_property
  def _checkpointer(self) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(os.path.join(self.directory, alma_run.CHECKPOINTS_DIR),
                                   mesh=self._mesh,
                                   shard_params=self.config.mesh.shard_params)

  @functools.cached_property
  def _mesh(self):
    return sharding.make_mesh()

  def _why_no_checkpoint(self) -> str:
    aside = checkpoint.corrupt_directory(os.path.join(self.directory, alma_run.CHECKPOINTS_DIR))
    return (f'its checkpoints were found corrupt and set aside in {aside}'
            if os.path.isdir(aside) else 'the run has yet to finish its first arrival')

  def arrivals(self) -> list[int]:
    """The arrivals whose run state is checkpointed (read without writing anything)."""
    return checkpoint.saved_steps(os.path.join(self.directory, alma_run.CHECKPOINTS_DIR))

  def state(self, t: int, parts: tuple[str, ...] | None = None) -> dict:
    """The run state {stream, learner, history} checkpointed after arrival `t` (only its
    `parts`, if given: the others are not read)."""
    if t not in self.arrivals():
      raise KeyError(f'{self.directory}: no checkpoint of arrival {t} (kept: {self.arrivals()})')
    try:
      return self._checkpointer.restore(t, parts)
    except checkpoint.CorruptCheckpointError as error:
      latest = t == self.arrivals()[-1]
      raise checkpoint.CorruptCheckpointError(
          f'{self.directory}: {error}' + ('. Running the command that started the run again '
                                          'sets it aside and goes on from the checkpoint before '
                                          'it' if latest else '')) from None

  def history(self, t: int) -> dict:
    """The per-arrival metrics checkpointed after arrival `t` (`metrics.HISTORY_FIELDS`,
    NaN for arrivals to come and for fields added since the run), read without the learner."""
    return metrics.completed(self.state(t, ('history',))['history'])

  @functools.cached_property
  def learner(self):
    """The run's learner, over its data set placed as the run's config says, on the devices
    present."""
    dataset = data.load(self.config.data)
    return learners.create(self.config, dataset,
                           placement.place(dataset, self._mesh,
                                           placement.choose(self.config.data, dataset)),
                           self._mesh)

  def predictor(self, t: int):
    """The learner state (the predictor) held after arrival `t`."""
    return self.learner.restore(self.state(t, ('learner',))['learner'])

  def evaluate(self, t: int, images=None, labels=None) -> dict:
    """{'error', 'loss'} of the predictor after arrival `t` on the test set, or on given data."""
    return self.learner.evaluate(self.predictor(t), images, labels)


COLUMNS = ('run', 'learner', 'arrivals', 'final error', 'CER/T', 'final loss', 'loss area/T',
           'params', 'peak buffer bytes', 'peak optimizer bytes', 'training FLOPs', 'seconds')


def table_rows(runs: list[Run], labels: list[str]) -> list[tuple]:
  """One tuple of COLUMNS per run. A partial run's arrivals read 'a/T (partial)'; its CER/T
  and final numbers cover only those arrivals."""
  out = []
  for label, r in zip(labels, runs):
    s = r.summary()
    done = f"{s['arrivals']}/{s['num_megabatches']}" + ('' if r.finished else ' (partial)')
    out.append((label, r.config.learner.name, done, s['final_error'], s['cer_per_t'],
                s['final_test_loss'], s['cumulative_loss_per_t'], int(s['params']),
                s['max_buffer_bytes'], s['max_optimizer_bytes'], s['train_flops'],
                s['seconds']))
  return out


def table(runs: list[Run], labels: list[str]) -> str:
  """A markdown comparison table of finished (and partial, marked) runs."""
  lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|---|---|---' + '|---:' * 9 + '|']
  for (label, learner, done, error, cer, loss, loss_area, params, buffer, optimizer, flops,
       seconds) in table_rows(runs, labels):
    lines.append(f'| {label} | {learner} | {done} | {error:.4f} | {cer:.4f} | {loss:.4f} | '
                 f'{loss_area:.4f} | {params:,d} | {buffer:.3g} | {optimizer:.3g} | '
                 f'{flops:.3g} | {seconds:.0f} |')
  return '\n'.join(lines)


def write_csv(runs: list[Run], labels: list[str], path: str) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(COLUMNS)
    writer.writerows(table_rows(runs, labels))


def pareto_front(costs: np.ndarray, values: np.ndarray) -> np.ndarray:
  """Indices of the points no other point beats on both (lower cost, lower value), by cost."""
  order = np.lexsort((values, costs))
  front, best = [], np.inf
  for i in order:
    if values[i] < best:
      front.append(i)
      best = values[i]
  return np.asarray(front, int)


def _curve(group: list[Run], field: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Arrivals, mean and standard deviation of `field` over the runs of `group` (seeds of one
  setting), over the arrivals all of them have logged."""
  rows = [r.rows() for r in group]
  n = min(len(x) for x in rows)
  values = np.array([[row[field] for row in x[:n]] for x in rows], float).reshape(len(rows), n)
  return np.arange(1, n + 1), values.mean(0), values.std(0)


def _first_round(group: list[Run]) -> int:
  """The first arrival after which every run of `group` has trained (0: none has)."""
  firsts = [next((row['t'] for row in r.rows() if row['trained']), 0) for r in group]
  return 0 if 0 in firsts else max(firsts)


def _language_models(runs: list[Run]) -> bool:
  """Whether `runs` are all of language models (else all of classifiers, or ValueError)."""
  lm = [r.language_model for r in runs]
  if any(lm) and not all(lm):
    raise ValueError('runs of a language model and of a classifier measure different things: '
                     'compare them apart')
  return all(lm)


def plot(runs: list, labels: list[str], out: str) -> list[str]:
  """Anytime curves, CER against training FLOPs (Pareto front marked), parameters over time:
  PNG files in `out`; returns their paths. An item of `runs` is a run or a list of runs (the
  seeds of one setting), drawn as their mean with a band of one standard deviation.

  The predictor is constant between arrivals, so curves are steps, each arrival's value held
  until the next (the last one's for one more arrival's width). Where the untrained
  predictor (before a setting's first round) is far worse than any trained one, the axis shows
  the trained range and says what it leaves out."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  os.makedirs(out, exist_ok=True)
  groups = [[r for r in (g if isinstance(g, (list, tuple)) else [g]) if r.arrivals()]
            for g in runs]  # (a run with no checkpoint yet has nothing to draw)
  labels = [label for label, g in zip(labels, groups) if g]
  groups = [g for g in groups if g]
  lm = _language_models(sum(groups, []))
  metric, axis_label, title = (
      ('test_bits', 'test bits per byte', 'Anytime test bits per byte') if lm else
      ('test_error', 'test error (1 - accuracy)', 'Anytime test error'))
  seeds = max(len(g) for g in groups)
  spread = f' (mean of {seeds} seeds, band: ± 1 std)' if seeds > 1 else ''
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  color = lambda i: colors[i % len(colors)]
  paths = []

  def finish(fig, ax, name, integer_x=True):
    if integer_x:
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:  # (none: every run left out, and said so)
      ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

  fig, ax = plt.subplots(figsize=(8.5, 4.5))
  trained_values, untrained_values = [], []
  for i, (label, group) in enumerate(zip(labels, groups)):
    if not group[0].rows():
      continue
    t, mean, std = _curve(group, metric)
    held, until = (lambda a: np.append(a, a[-1])), np.append(t, t[-1] + 1)
    ax.step(until, held(mean), where='post', color=color(i), label=label)
    ax.plot(t, mean, 'o', ms=3, color=color(i))
    if len(group) > 1:
      ax.fill_between(until, held(mean - std), held(mean + std), step='post', color=color(i),
                      alpha=0.2, lw=0)
    first = _first_round(group)
    trained = t >= first if first else np.zeros_like(t, bool)
    trained_values += list(mean[trained] + std[trained])
    untrained_values += list(mean[~trained])
  if trained_values and untrained_values:
    low = min(trained_values + untrained_values)
    high = max(trained_values)
    if max(untrained_values) > high + 0.5 * (high - low):
      margin = 0.08 * (high - low)
      ax.set_ylim(low - margin, high + margin)
      values = sorted({f'{v:.2f}' for v in untrained_values})
      shown = values[0] if len(values) == 1 else f'{values[0]} to {values[-1]}'
      ax.text(0.99, 0.98, f'untrained predictors ({shown}) above the axis', ha='right',
              va='top', fontsize=7, transform=ax.transAxes)
  ax.set(xlabel='arrival t (mega-batches so far)', ylabel=axis_label, title=title + spread)
  ax.grid(alpha=0.3)
  finish(fig, ax, 'anytime.png')

  # Only finished runs are compared: a partial run's area covers fewer arrivals.
  area = 'cumulative_loss_per_t' if lm else 'cer_per_t'
  points, partial, uncounted = [], [], []
  for i, (label, group) in enumerate(zip(labels, groups)):
    if not all(r.finished for r in group):
      partial.append(label)
      continue
    summaries = [r.summary() for r in group]
    flops = np.mean([x['train_flops'] for x in summaries])
    if not np.isfinite(flops):  # the backend gave no count
      uncounted.append(label)
      continue
    points.append((i, label, flops, np.mean([x[area] for x in summaries]),
                   np.std([x[area] for x in summaries])))
  fig, ax = plt.subplots(figsize=(8.5, 4.5))
  for i, label, x, y, err in points:
    ax.errorbar(x, y, yerr=err if seeds > 1 else None, fmt='o', ms=6, color=color(i),
                capsize=3, label=label)
  left_out = ([f"unfinished: {', '.join(partial)}"] if partial else []) + (
      [f"FLOPs not counted: {', '.join(uncounted)}"] if uncounted else [])
  if left_out:
    ax.text(0.01, 0.01, 'not shown, ' + '; '.join(left_out), fontsize=7, transform=ax.transAxes)
  if points:
    flops = np.array([p[2] for p in points])
    cer = np.array([p[3] for p in points])
    front = pareto_front(flops, cer)
    ax.plot(flops[front], cer[front], color='0.3', lw=1, ls='--', marker='o', mfc='none',
            ms=12, label='Pareto front')
  ax.set(xscale='log', xlabel='training FLOPs (XLA cost analysis, log scale)',
         ylabel=('area under the test loss curve / T' if lm else 'CER / T'),
         title='Anytime performance against compute' + spread.replace('band', 'bars'))
  ax.grid(alpha=0.3, which='both')
  finish(fig, ax, 'cer_vs_flops.png', integer_x=False)

  fig, ax = plt.subplots(figsize=(8.5, 4.5))
  for i, (label, group) in enumerate(zip(labels, groups)):
    if not group[0].rows():
      continue
    t, mean, _ = _curve(group, 'params')
    ax.step(np.append(t, t[-1] + 1), np.append(mean, mean[-1]), where='post', color=color(i),
            label=label)
    ax.plot(t, mean, 'o', ms=3, color=color(i))
  ax.set(yscale='log', xlabel='arrival t (mega-batches so far)',
         ylabel='parameters of the predictor (log scale)', title='Parameters over time')
  ax.grid(alpha=0.3, which='both')
  finish(fig, ax, 'params.png')
  return paths


def cli(argv: list[str] | None = None) -> None:
  """The command line (`alma-jax-analyze`): the table on stdout, the plots in --out."""
  parser = argparse.ArgumentParser(
      prog='alma-jax-analyze', description='Compares alma_jax runs: a table on stdout, plots and '
      'table.csv in --out. (Predictors at any arrival: the alma_jax.analyze.Run API.)')
  parser.add_argument('runs', nargs='+', help='run directories (workdirs)')
  parser.add_argument('--out', default='analysis', help='folder for the PNG plots and '
                      'table.csv (default: ./analysis)')
  parser.add_argument('--labels', default='', help='comma-separated names of the runs in the '
                      'table and plots (default: the directory names)')
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
  try:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
      raise NotARunError(f'--out={args.out}: a file, not a folder for the plots')
    runs = [Run(d) for d in args.runs]
    labels = args.labels.split(',') if args.labels else [r.name for r in runs]
    if len(labels) != len(runs):
      raise ValueError(f'--labels names {len(labels)} run(s), but {len(runs)} run(s) were '
                       f'given')
    started = [bool(r.arrivals()) for r in runs]
    if not any(started):
      raise NotARunError('none of the runs has a checkpoint: ' + '; '.join(
          f'{r.name} ({r._why_no_checkpoint()})' for r in runs))
    if not all(started):
      print('left out, no checkpoint yet: ' + ', '.join(
          label for label, s in zip(labels, started) if not s), file=sys.stderr)
      runs, labels = ([x for x, s in zip(xs, started) if s] for xs in (runs, labels))
    _language_models(runs)
    print(table(runs, labels))
    there = set(os.listdir(args.out)) if os.path.isdir(args.out) else set()
    said = lambda path: print(('replaced ' if os.path.basename(path) in there else 'wrote ')
                              + path)
    for path in plot(runs, labels, args.out):
      said(path)
    write_csv(runs, labels, os.path.join(args.out, 'table.csv'))
    said(os.path.join(args.out, 'table.csv'))
  except (NotARunError, ValueError) as error:  # (a damaged checkpoint's too)
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  cli()
