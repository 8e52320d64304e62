set -u
o=${OUT:-/tmp/diagout}; mkdir -p $o
export JAX_TRACEBACK_FILTERING=off
G=${G:-configs/lm.py:gpt2_small}
d() { n=$1; t=$2; shift 2; echo "== $n"; timeout $t "$@" > $o/$n.log 2>&1; echo "rc=$?"; grep -E "RESULT|Error|rror:|^ *[0-9]+ " $o/$n.log | tail -n 6 | cut -c1-300; }
demo="python3 -m alma_jax.main --config=configs/fashion_mnist.py --config.stream.num_megabatches=2 --config.train.max_epochs=2 --config.log.tensorboard=False"
d demo_detonly 45 env XLA_FLAGS=--xla_gpu_deterministic_ops=true $demo --workdir=/tmp/d1 --config.backend.deterministic=False
d demo_new 45 $demo --workdir=/tmp/d2
d lm_detonly_auto 60 env XLA_FLAGS=--xla_gpu_deterministic_ops=true python3 .device/diag_lm.py $G auto nodet 10
d lm_new_auto 60 python3 .device/diag_lm.py $G auto det 10
grep -q RESULT $o/lm_new_auto.log || d lm_new_xla 60 python3 .device/diag_lm.py $G xla det 10
timeout ${BT:-220} python3 experiments/benchmark_accelerator.py --only=peak,lm_gpt2,demo,nondeterministic --out=$o/accelerator_gpu.json --profile=/tmp/prof > $o/bench.log 2>&1; echo "bench rc=$?"
grep -E "Error|error" $o/bench.log | cut -c1-300 | head -n 8
python3 experiments/device_summary.py $o 2>&1 | tail -n 12
for r in lm_gpt2 lm_gpt2_nondeterministic; do [ -d /tmp/prof/$r ] && timeout 30 python3 experiments/profile_summary.py /tmp/prof/$r --out=$o/${r}_profile.json | tail -n 22; done
