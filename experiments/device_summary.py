"""The targets of #12 and #13, read off the JSONs that `device_checks.sh run` wrote:

    python experiments/device_summary.py DIR [--cpu=experiments/results/accelerator_cpu.json]
    python experiments/device_summary.py experiments/results/h100 --prefix=run7_

One line per target (a missing file or section says so), so that the device call's output
alone says how the run went. The training FLOPs are compared with the CPU run's in `--cpu`.
The sections of every `<prefix>accelerator*_<backend>.json` are read as one run's (a second
call that ran the sections a first one's time limit cut, `benchmark_accelerator.py --only=...
--out=accelerator_rest_gpu.json`, completes it; where two files have a section, the one later
by name wins); each file's commit is printed.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def targets(sections: dict, cpu_sections: dict) -> list[tuple[str, object]]:
  """(what, value) of each target; a value is computed lazily, so one that fails says why."""
  demo, torch, peak = sections.get('demo', {}), sections.get('torch', {}), sections.get('peak', {})
  return [
      ('matmul peak, TFLOP/s', lambda: f"{peak['flops'] / 1e12:.3g} ({peak['dtype']})"),
      *[(f'GPT-2-small MFU, {name} attention (target >= 0.40)', lambda r=r: _mfu(r))
        for name, r in sections.get('lm_gpt2', {}).items() if isinstance(r, dict)],
      ('GPT-2-small MFU without deterministic kernels',
       lambda: _mfu(sections['nondeterministic']['lm'])),
      ("GPT-2-medium MFU (blocks recomputed: PaLM's count is the model's)",
       lambda: f"{sections['lm_gpt2_medium']['mfu_palm']:.3f}, by XLA's count "
               + _mfu(sections['lm_gpt2_medium'])),
      ('demo rounds, PyTorch / alma_jax (target >= 5): empty, filled cache',
       lambda: ', '.join(f"{torch['rounds_s'] / demo[k]['rounds_s']:.1f}"
                         for k in ('first', 'again'))),
      ('demo rows identical: again, resumed',
       lambda: f"{demo['identical_rows']['again']}, {demo['identical_rows']['resumed']}"),
      ('LM rows identical: again, resumed',
       lambda: ', '.join(str(v) for v in sections['lm_runs']['identical_rows'].values())),
      # Per example trained: the runs' totals differ as early stopping picks other epoch counts.
      ('demo training FLOPs per example / CPU run\'s (target within 0.01 of 1)', lambda: (
          f"{_per_example(demo) / _per_example(cpu_sections['demo']):.6f} "
          f"({_per_example(demo):,.0f} FLOPs)")),
      ('default LM step\'s training FLOPs per token / CPU run\'s (target within 0.01 of 1)',
       lambda: (f"{_per_token(sections) / _per_token(cpu_sections):.6f} "
                f"({_per_token(sections):,.0f} FLOPs)")),
      ('cost of determinism: GPT-2-small step ms, deterministic / not', lambda: (
          f"{sections['lm_gpt2']['auto']['step_ms']:.1f} / "
          f"{sections['nondeterministic']['lm']['step_ms']:.1f}")),
      ('cost of determinism: demo rounds s (empty cache), deterministic / not', lambda: (
          f"{demo['first']['rounds_s']:.1f} / "
          f"{sections['nondeterministic']['demo']['rounds_s']:.1f}")),
      ('demo to its first arrival, empty / filled cache (target: 2x sooner)',
       lambda: _first_arrival(demo)),
  ]


def _first_arrival(demo: dict) -> str:
  """Seconds to the row of arrival 1 in both runs, and before that to reaching it (start-up:
  recorded since 0.9.10)."""
  times = lambda key: (f"{demo['first'][key]:.1f} s / {demo['again'][key]:.1f} s "
                       f"({demo['first'][key] / demo['again'][key]:.2f}x)")
  reached = (f"reached {times('startup_wall_s')}, "
             if demo['first'].get('startup_wall_s') is not None else '')
  return f"{reached}its row {times('first_arrival_s')}"


def _mfu(r: dict) -> str:
  return (f"{r['mfu_xla']:.3f} ({r['step_ms']:.1f} ms a step; {r.get('attention_kernel', '?')}"
          f" attention kernel, deterministic kernels: {r.get('deterministic_gpu_kernels', '?')})")


def _per_token(sections: dict) -> float:
  return sections['lm_default']['xla_train_flops_per_token']


def _per_example(demo: dict) -> float:
  return demo['first']['train_flops'] / demo['first']['train_examples']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('folder')
  parser.add_argument('--prefix', default='', help="the files' prefix: run7_ for run7_*.json")
  parser.add_argument('--cpu', default=os.path.join(ROOT, 'experiments', 'results',
                                                    'accelerator_cpu.json'))
  args = parser.parse_args()
  read = lambda path: json.load(open(path)) if os.path.exists(path) else {}
  files = lambda pattern: sorted(glob.glob(os.path.join(args.folder, args.prefix + pattern)))
  backend = next((b for b in ('gpu', 'tpu', 'cpu') if files(f'accelerator*_{b}.json')), 'gpu')
  result = {'device': 'no accelerator_*.json', 'sections': {}, 'section_seconds': {}}
  for path in files(f'accelerator*_{backend}.json'):
    written = read(path)
    print(f"{os.path.basename(path)}: commit {written.get('commit', '?')}, "
          f"sections {', '.join(written.get('sections') or {}) or 'none'}")
    result['device'] = written.get('device', result['device'])
    for key in ('sections', 'section_seconds'):
      result[key].update(written.get(key) or {})
  print(f"device: {result['device']}")
  for what, value in targets(result['sections'], read(args.cpu).get('sections', {})):
    try:
      shown = value()
    except (KeyError, TypeError, ZeroDivisionError) as missing:
      shown = f'not measured ({type(missing).__name__}: {missing})'
    print(f'{what}: {shown}')
  seconds = result['section_seconds']
  print('seconds a section: ' + (', '.join(f'{k} {v:.0f}' for k, v in seconds.items())
                                 or 'not recorded'))
  for path in files('streaming_*.json'):
    ratio = read(path).get('host_over_device')
    print(f'{os.path.basename(path)}: streamed / resident throughput (target >= 0.90): '
          + (f'{ratio:.3f}' if ratio else 'not measured'))
  for path in files('attention_*.json'):
    kernels = read(path).get('kernels', {})
    print(f'{os.path.basename(path)}: attention forward and backward, ms a block: '
          + (', '.join(f"{k} {r['ms']:.3f}" + ('' if r['bitwise_repeatable'] else ' (varies)')
                       if 'ms' in r else f'{k} failed' for k, r in kernels.items())
             or 'not measured'))


if __name__ == '__main__':
  main()
