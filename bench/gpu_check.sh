#!/usr/bin/env bash
# One command for a lent GPU (an H100: about 8 minutes): the Triton kernels, the fused and distillation losses,
# FlexAttention, 20 steps of the preset's model, the memory plan against the measured peak, a 2-member
# distillation step. Each part reports its result or its error and the next one runs. Results go to $OUT (or
# logs/gpu_check): GPU_RESULTS.md, gpu_check.json, gpu_check.log. --dry-run: the same parts on CPU at tiny shapes.
# See bench/GPU.md.
set -u
cd "$(dirname "$0")/.."
exec python3 bench/gpu_check.py "$@"
