"""Data parallelism over 8 fake CPU devices gives the errors of 1 device (float tolerance)."""
import json
import os
import subprocess
import sys

from conftest import REPO

SCRIPT = '''
import json, sys
sys.path.insert(0, {tests!r})
import jax
from conftest import tiny_config
from alma_jax import run
config = tiny_config({data!r})
config.stream.num_megabatches = 3
config.train.update(max_epochs=3, patience=3)
summary = run.run(config, {workdir!r})
rows = [json.loads(l) for l in open({workdir!r} + '/metrics.jsonl')]
print(json.dumps({{'devices': jax.device_count(), 'losses': [r['test_loss'] for r in rows],
                  'errors': [r['test_error'] for r in rows]}}))
'''


def run_with_devices(n, idx_dir, workdir):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={n}')
  script = SCRIPT.format(tests=os.path.join(REPO, 'tests'), data=idx_dir, workdir=workdir)
  out = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_eight_devices_match_one(idx_dir, tmp_path):
  one = run_with_devices(1, idx_dir, str(tmp_path / 'one'))
  eight = run_with_devices(8, idx_dir, str(tmp_path / 'eight'))
  assert one['devices'] == 1 and eight['devices'] == 8
  # Gradients are summed in a different order over 8 shards: equal up to float32 rounding.
  for a, b in zip(one['losses'], eight['losses']):
    assert abs(a - b) <= 1e-4 * max(1.0, abs(a))
  for a, b in zip(one['errors'], eight['errors']):
    assert abs(a - b) <= 2 / 400  # at most two of the 400 test examples flip
