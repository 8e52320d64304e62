"""Where the time of a profiled program goes, read off a `jax.profiler` trace:

    python experiments/profile_summary.py DIR [--steps=N] [--out=PATH]

Reads the newest `*.trace.json.gz` under DIR (as `benchmark_lm.py`'s `profile` writes it) and
prints, per step (N steps, else as many as DIR's `steps.json` says, else 1): the span from the first to the last XLA operation,
the busy time (each event's own time, without the events nested in it, summed over the
device's streams, or over a CPU's threads, so it can exceed the span), that time split into
kinds of work (matrix multiplies, attention, sorts, other fusions, copies, collectives), and the
operations that take the most. On GPUs and TPUs the events are the device's kernels; on CPUs,
XLA's operations on the host threads.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

KINDS = (  # the first pattern that matches an event's name or XLA operation names its kind
    ('attention', re.compile(r'cudnn|fmha|flash|attention|sdpa|\bmha', re.I)),
    ('matrix multiply', re.compile(r'gemm|xmma|cutlass|cublas|nvjet|matmul|\bdot|ynn', re.I)),
    ('collective', re.compile(r'all-reduce|all-gather|reduce-scatter|all-to-all|nccl', re.I)),
    # (CUB's radix sorts: what XLA's deterministic GPU scatter-add runs to order its indices)
    ('sort', re.compile(r'sort', re.I)),
    ('copy', re.compile(r'copy|memcpy|memset|transpose', re.I)),
    ('other fusion', re.compile(r'fusion|reduce|loop|input', re.I)),
)


def newest_trace(directory: str) -> str:
  traces = glob.glob(os.path.join(directory, '**', '*.trace.json.gz'), recursive=True)
  if not traces:
    raise SystemExit(f'{directory}: no *.trace.json.gz under it (written by jax.profiler)')
  return max(traces, key=os.path.getmtime)


def kind(name: str, op: str) -> str:
  for label, pattern in KINDS:
    if pattern.search(name) or pattern.search(op):
      return label
  return 'other'


def operations(trace: dict) -> list[dict]:
  """The trace's XLA operations (device kernels where a device process exists, else the host's
  events that name an XLA operation), each with its own time (`self`, microseconds)."""
  processes = {e['pid']: e['args']['name'] for e in trace['traceEvents']
               if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  devices = {pid for pid, name in processes.items() if name.startswith('/device:')}
  events = [e for e in trace['traceEvents'] if e.get('ph') == 'X' and 'dur' in e and (
      e['pid'] in devices if devices else 'hlo_op' in e.get('args', {}))]
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[e['pid'], e.get('tid')].append(e)
  end = lambda e: e['ts'] + e['dur']
  for thread in by_thread.values():  # subtract nested events from the one enclosing them
    thread.sort(key=lambda e: (e['ts'], -e['dur']))
    open_events = []
    for e in thread:
      e['self'] = e['dur']
      while open_events and end(open_events[-1]) <= e['ts']:
        open_events.pop()
      if open_events and end(e) <= end(open_events[-1]):  # overlapping kernels do not nest
        open_events[-1]['self'] -= e['dur']
      open_events.append(e)
  return events


def summary(trace: dict, steps: int = 1, top: int = 15) -> dict:
  events = operations(trace)
  if not events:
    raise SystemExit('the trace holds no XLA operations')
  span = max(e['ts'] + e['dur'] for e in events) - min(e['ts'] for e in events)
  by_kind, by_op = collections.Counter(), collections.defaultdict(lambda: [0, 0.0, ''])
  for e in events:
    op = e.get('args', {}).get('hlo_op', '')
    by_kind[kind(e['name'], op)] += e['self']
    entry = by_op[e['name']]
    entry[0] += 1
    entry[1] += e['self']
    entry[2] = entry[2] or op
  busy = sum(by_kind.values())
  ms = lambda us: us / 1e3 / steps
  return {
      'steps': steps, 'span_ms': ms(span), 'busy_ms': ms(busy),
      'by_kind_ms': {k: ms(v) for k, v in by_kind.most_common()},
      'top': [{'name': name, 'hlo_op': op, 'calls': calls / steps, 'ms': ms(us),
               'share': us / busy}
              for name, (calls, us, op) in sorted(by_op.items(), key=lambda kv: -kv[1][1])[:top]],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('directory')
  parser.add_argument('--steps', type=int, default=0)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  path = newest_trace(args.directory)
  # benchmark_lm.py's record of the steps traced, and of where they ran
  recorded = os.path.join(args.directory, 'steps.json')
  measured = json.load(open(recorded)) if os.path.exists(recorded) else {}
  traced = measured.pop('steps', 1)
  steps = args.steps or traced
  with gzip.open(path) as f:
    result = {**measured, 'trace': path, **summary(json.load(f), steps)}
  unit = f'a step ({steps} traced)' if steps > 1 else 'in all'
  print(f"{path}\nspan {result['span_ms']:.2f} ms {unit}, busy {result['busy_ms']:.2f} ms")
  for name, ms in result['by_kind_ms'].items():
    print(f'  {name:<16} {ms:9.3f} ms  {ms / result["busy_ms"]:6.1%}')
  print(f'{"ms":>9} {"share":>6} {"calls":>6}  operation')
  for op in result['top']:
    print(f"{op['ms']:9.3f} {op['share']:6.1%} {op['calls']:6.1f}  {op['name'][:90]}"
          + (f" ({op['hlo_op']})" if op['hlo_op'] and op['hlo_op'] != op['name'] else ''))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  main()
