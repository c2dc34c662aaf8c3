#!/usr/bin/env bash
# The GPU benchmark suite, one command for a lent accelerator (or any GPU machine with the project's
# dependencies): the likelihood ODE's in-loop cost against its standalone evaluation (benchmarks/ode_loop.py),
# the bits/dim pipeline's ms/NFE and images/s (benchmarks/likelihood.py) and the networks' forward/train
# images/s and MFU (benchmarks/models.py), for DDPM++ cont. (VP) at batch 128.  Each table is printed and
# written to $OUT (default ./gpu_results).  SMALL=1 runs the same commands at tiny sizes (a CPU check of the
# script itself).  Each benchmark has its own time limit so that one slow compile cannot eat the others.
set -uo pipefail
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cfg=vp/cifar10_ddpmpp_continuous
if [ "${SMALL:-0}" = 1 ]; then
  loop_args=(--small --odes likelihood --solvers euler --steps 4 --reps 1 --no-vjp-ref)
  lik_args=(--small --dtypes float32)
  model_args=(--small --dtypes float32 --iters 2 --warmup 1)
else
  loop_args=(--config "$cfg" --nf 128 --batch 128 --odes likelihood,sampling --solvers euler --steps 10 --reps 3)
  lik_args=(--configs "$cfg" --batch 128 --dtypes float32,bfloat16 --iters 1)
  model_args=(--configs "$cfg" --batch 128 --dtypes float32,bfloat16 --iters 10 --warmup 3)
fi
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$OUT/devices.txt"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv \
  | tee -a "$OUT/devices.txt"
timeout "${LOOP_S:-150}" python3 benchmarks/ode_loop.py "${loop_args[@]}" 2>&1 | grep -v Warning | tee "$OUT/ode_loop.txt"
timeout "${LIK_S:-200}" python3 benchmarks/likelihood.py "${lik_args[@]}" 2>&1 | grep -v Warning | tee "$OUT/likelihood.txt"
timeout "${MODELS_S:-150}" python3 benchmarks/models.py "${model_args[@]}" 2>&1 | grep -v Warning | tee "$OUT/models.txt"
echo "tables in $OUT"
