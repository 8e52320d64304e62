"""Diagnosis only: GPT-2-small step with a given attention and determinism; prints step_ms."""
import json, os, sys
sys.path.insert(0, 'experiments')
import common  # noqa
from alma_jax import backend, config as alma_config, data
config, attention, mode, steps = sys.argv[1:5]
c = alma_config.load(config)
c.model.attention = attention
c.backend.deterministic = mode == 'det'
backend.configure(c.backend)
import benchmark_lm
r = benchmark_lm.throughput(c, data.load(c.data), int(steps), 785e12)
print('XLA_FLAGS', os.environ.get('XLA_FLAGS'))
print('RESULT', json.dumps({k: r[k] for k in ('step_ms', 'first_epoch_seconds_with_compile', 'mfu_palm')}))
