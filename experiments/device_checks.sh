#!/usr/bin/env bash
# The GPU checks that #12 and #13 leave open, as one call of the device tool (its limit: 600 s).
# The steps are ordered so that what matters most comes first, and what a stopped call wrote
# still comes back. The last step, the attention kernels (a diagnostic: runs 4, 5 and 7 of
# experiments/results/h100 measured them), gets what is left of 570 s counted from this
# script's start (setup.sh's installs before it are not counted) and is skipped when that is
# under 80 s. On run 7's H100 (0.9.8) the benchmark's sections took about 460 s in all and the
# streamed path about 45 s, so the attention kernels (about 70 s) would be skipped there; on
# run 5's machine, about 100 s faster, they would run. Two steps:
#
#   bash experiments/device_checks.sh prepare     # here, after `bash install.sh`: packs .device/
#   # device tool, carry [".device"], timeout_s 600:
#   source .device/setup.sh; bash experiments/device_checks.sh run
#
# `prepare` runs ../shared/device/prepare.sh (data sets, ml-collections, tensorboardX), leaves out
# MNIST (unused here; the carry must stay under 64 MiB) and adds the wheels the streamed path
# needs there (Grain and its compiled dependency, for the device's Python 3.12). `run` writes
# into $OUT (which the device tool brings back; else a new temporary folder, which it names;
# never over the committed results):
# accelerator_<backend>.json (benchmark_accelerator.py: FLOPs, identical rows of repeated and
# resumed runs, start-up, GPT-2 small's and medium's MFU, the PyTorch demo) and
# streaming_<backend>.json (the default LM streamed vs device-resident), then prints the targets
# read off them (device_summary.py), where a GPT-2-small step's time goes, with deterministic
# kernels (Pallas's attention) and without (cuDNN's) (profile_summary.py;
# lm_gpt2[_nondeterministic]_profile.json, and the traces for Perfetto in traces.tar), and
# attention_<backend>.json (benchmark_attention.py: each attention kernel and Pallas tiling,
# forward and backward, at GPT-2 small's shape): 6 files, and the tool brings back at most 8
# (with the log that the command tees there, 7). Each step has its own time limit, so one that
# hangs leaves the others their time.
# (`run` also runs on a CPU, as a check of the script.)
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  prepare)
    set -e
    bash ../shared/device/prepare.sh
    rm -rf .device/site/mnist  # no check here reads MNIST; the carry must stay under 64 MiB
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d .device/whl \
      grain==0.2.18 array_record==0.8.6 cloudpickle==2.1.0 portpicker==1.6.0
    du -sh .device
    ;;
  run)
    out=${OUT:-$(mktemp -d)}
    echo "writing into $out"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    # setup.sh hides pip's errors: say here what failed to install, if anything did.
    python3 -c 'import grain, ml_collections, tensorboardX, alma_jax' || echo "MISSING PACKAGES" >&2
    backend=$(python3 -c 'import jax; print(jax.default_backend())')
    profile=$(mktemp -d)
    stopped() { echo "$1 stopped early: exit $2 (124: its time limit)"; }
    timeout 480 python3 experiments/benchmark_accelerator.py \
      --out="$out/accelerator_$backend.json" --profile="$profile" || stopped benchmark_accelerator $?
    python3 experiments/device_summary.py "$out"  # the targets, early in the call's output
    timeout 60 python3 experiments/benchmark_streaming.py --steps=100 --repeats=3 \
      --out="$out/streaming_$backend.json" || stopped benchmark_streaming $?  # (H100: ~45 s)
    python3 experiments/device_summary.py "$out" | grep -i stream
    # Where a GPT-2-small step's time goes (3 steps traced after the timed ones), with
    # deterministic kernels and without, and the traces.
    for run in lm_gpt2 lm_gpt2_nondeterministic; do  # (the last: GPUs only)
      [ -d "$profile/$run" ] || continue
      timeout 30 python3 experiments/profile_summary.py "$profile/$run" \
        --out="$out/${run}_profile.json" || stopped profile_summary $?
      find "$profile/$run" -name '*.trace.json.gz' -exec cp {} "$profile/$run.trace.json.gz" \;
    done
    # One file for the traces: the device tool brings back at most 8 files (run 5's ninth, the
    # streamed path's JSON, stayed behind).
    traces=$(cd "$profile" && ls -- *.trace.json.gz 2>/dev/null)
    [ -z "$traces" ] || tar -cf "$out/traces.tar" -C "$profile" $traces
    left=$((570 - SECONDS))
    if [ "$left" -ge 80 ]; then  # (H100: ~70 s)
      timeout "$left" python3 experiments/benchmark_attention.py --steps=0 \
        --out="$out/attention_$backend.json" || stopped benchmark_attention $?
    else
      echo "benchmark_attention skipped: ${left} s left of this script's 570"
    fi
    ;;
  *)
    echo "usage: bash experiments/device_checks.sh prepare|run" >&2
    exit 2
    ;;
esac
