#!/usr/bin/env bash
# Issue 10's GPU evidence in one command: LLaVA-NeXT-7B's architecture with random weights (no
# checkpoint needed), float16, SDPA, on one GPU, for random, pooling, fastv and globalcom2 at
# r = 0.75 / 0.5 / 0.25 / 0.1. Every job also measures vanilla LLaVA-NeXT (compressor=none) beside
# its compressor; the table's first row is that baseline. Writes
#   results/efficiency/<GPU name>/efficiency_results.{csv,json}   (every job, baseline first)
#   results/efficiency/<GPU name>/llava_next_7b/<overrides>/efficiency.json   (one per job)
# A killed sweep resumes: rerunning skips finished jobs.
#   scripts/efficiency_7b_gpu.sh [more overrides, e.g. device_preset=h100 repeats=20]
set -euo pipefail
cd "$(dirname "$0")/.."
gpu=$(python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
python -m runners.efficiency -m experiment=ratio_sweep \
    model=llava_next_7b model.random_init=true model.dtype=float16 model.attn_implementation=sdpa \
    model.device_map=cuda:0 warmup=3 repeats=10 decode_tokens=32 flop_check=true progress=false \
    hydra.sweep.dir="results/efficiency/${gpu}" "$@"
