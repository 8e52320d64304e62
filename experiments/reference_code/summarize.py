"""A table of the reference code's runs under OUT (from run.sh), read from its own logger.

    python experiments/reference_code/summarize.py ALMA_CHECKOUT OUT

Per learner, mean ± standard deviation over the seeds found: the final test error and CER/T
(the mean test error over the T=10 arrivals), the parameters after the last arrival and the
training MFLOPs the reference logs (fvcore's forward count x examples; see experiments/README.md
for where its logging is known to be off), then the mean test error after each arrival.
"""
import collections
import contextlib
import io
import os
import sys

import numpy as np

T = 10


def read(alma: str, directory: str) -> dict:
  sys.path.insert(0, alma)
  from crlapi.logger import read_log
  with contextlib.redirect_stdout(io.StringIO()):
    values = read_log(os.path.join(directory, 'tb')).values
  first = lambda key: (values.get(key) or [None])[0]
  errors = [1 - first(f'evaluation_stage_{t}/accuracy') for t in range(T)]
  return {'errors': errors, 'params': first(f'train_stage_{T - 1}/train/model_params'),
          'train_mflops': sum(first(f'train_stage_{t}/train/total_megaflops') or 0
                              for t in range(T))}


def main(alma: str, out: str) -> None:
  runs = collections.defaultdict(list)
  for name in sorted(os.listdir(out)):
    if os.path.isfile(os.path.join(out, name, 'tb', 'done')):
      runs[name.rsplit('_s', 1)[0]].append(read(alma, os.path.join(out, name)))
  band = lambda x: f'{np.mean(x):.4f} ± {np.std(x, ddof=1):.4f}' if len(x) > 1 else f'{x[0]:.4f}'
  print('| learner | seeds | final error | CER/T | params | training MFLOPs (logged) |')
  print('|---|---:|---:|---:|---:|---:|')
  for learner, group in runs.items():
    errors = np.array([r['errors'] for r in group])
    print(f'| {learner} | {len(group)} | {band(errors[:, -1])} | {band(errors.mean(1))} | '
          f'{group[0]["params"]:,} | {np.mean([r["train_mflops"] for r in group]):,.0f} |')
  for learner, group in runs.items():
    mean = np.mean([r['errors'] for r in group], 0)
    print(f'{learner}: ' + ', '.join(f'{e:.4f}' for e in mean))


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2])
