#!/usr/bin/env bash
# The prepared GPU check (see bench/gpu_check.py): every script on CUDA with and without --amp and
# --compile, torchrun over all visible GPUs (nccl), a resume on CUDA, biggan_sn --sync_bn, fid.py on
# CUDA against the CPU, throughput. Writes bench/results/gpu.md. At most 8 minutes on one GPU.
#   bash bench/gpu_check.sh             # on a CUDA machine
#   bash bench/gpu_check.sh --dry-run   # anywhere: the plan, nothing run
set -uo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 python bench/gpu_check.py "$@"
