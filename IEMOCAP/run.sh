#!/usr/bin/env bash
# IEMOCAP from raw release to fusion results: preparation + the eight stages (docs/METHOD.md §0).
#   bash IEMOCAP/run.sh [--data_dir D] [--pretrained_dir P] [--epochs N] [--fusion_epochs N] [--force] [--nproc_per_node N]
# Runs IEMOCAP/pipeline.py (its --help lists every flag). Each flag can come from its environment variable:
# DATA_DIR PRETRAINED_DIR SAVE_DIR FEATURE_DIR DEVICE NUM_WORKERS EPOCHS FUSION_EPOCHS LEARNING_RATE
# SEEDS ("2024 2025") FUSION_ARGS ("--lr 1e-3") NPROC_PER_NODE (the first-stage, frames and features
# stages under torchrun, N processes).
# Stops at the first failing stage (named in the error); skips stages whose outputs are up to date.
set -euo pipefail
# No cd: relative --data_dir/--save_dir/... are the caller's, resolved against this directory.
exec python "$(dirname "$0")/pipeline.py" "$@"
