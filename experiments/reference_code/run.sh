#!/usr/bin/env bash
# The reference code (facebookresearch/alma) on the full MNIST, offline, with its own MNIST
# configs (T=10 mega-batches, training after every arrival, 2x64 MLP, each learner's yaml), a
# seeded run per learner and seed; then a table of what it logged.
#
#   bash experiments/reference_code/run.sh ALMA_CHECKOUT OUT ["SEEDS"] ["LEARNERS"]
#
# ALMA_CHECKOUT: a checkout of https://github.com/facebookresearch/alma (measured at 02a6d0e).
# Needs torch, torchvision, hydra-core, omegaconf, fvcore, pandas, tensorboard (pip install).
# OUT/<learner>_s<seed>/ gets each run's log and the reference's own logger output.
set -euo pipefail
alma=$(realpath "$1"); out=$(realpath -m "$2"); seeds=${3:-"0 1 2"}; only=${4:-}
here=$(dirname "$(realpath "$0")")
mkdir -p "$out"
python "$here/mnist_idx.py" "$out/data"
pythonpath="$alma"
python -c "import torchvision" 2>/dev/null || pythonpath="$alma:$here/torchvision_shim"
# learner name -> the reference's yaml (configs/mnist/*.yaml), and its overrides
runs=("finetune test_finetune_mlp replay=0" "gens ensemble replay=0" "k_ensemble kensemble replay=0"
      "boosting boosting" "moe test_finetune_moe" "gmoe test_usage_gmoe replay=0")
for seed in $seeds; do
  for spec in "${runs[@]}"; do
    read -r name yaml overrides <<< "$spec"
    [ -n "$only" ] && [[ " $only " != *" $name "* ]] && continue
    dir="$out/${name}_s$seed"
    [ -f "$dir/tb/done" ] && continue
    mkdir -p "$dir"
    (cd "$alma" && PYTHONPATH="$pythonpath" python "$here/seeded.py" \
      --config-path="$alma/configs/mnist" --config-name="$yaml" n_megabatches=10 device=cpu \
      data_dir="$out/data" +seed="$seed" clmodel.training_num_workers=0 \
      clmodel.validation_num_workers=0 evaluation.num_workers=0 logger.log_dir="$dir/tb" \
      hydra.run.dir="$dir/hydra" $overrides) > "$dir/log.txt" 2>&1
    echo "$name seed $seed: done"
  done
done
PYTHONPATH="$pythonpath" python "$here/summarize.py" "$alma" "$out"
