#!/usr/bin/env bash
# Offline-to-online RL end to end on a CPU with no internet, in a few minutes:
# build a small random-policy Hopper dataset (once), pretrain IQL+FamO2O on it offline,
# fine-tune it online, and print the normalized score before and after fine-tuning.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import minari; minari.load_dataset('o2o/hopper/random-v0')" >/dev/null 2>&1; then
    python scripts/make_datasets.py --env Hopper-v5 --levels random --size 100000 --seed 0
fi
python algorithms/iql_famo2o.py --config_path configs/quickstart/iql_famo2o.yaml "$@"
