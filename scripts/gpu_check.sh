#!/usr/bin/env bash
# The GPU check (issue 21): one command, about ten minutes on one H100-class GPU.
#
#   1. the device: nvidia-smi, torch's view of it
#   2. the CUDA tests: pytest -m cuda
#   3. benchmarks/mask_speed.py, step_overhead.py, memory.py with --device cuda
#   4. a 10-round slice of each paper setup (100 clients, the reference's models, generated
#      data): seconds per round of FedAvg and of LIPS
#
# Everything printed also goes to one folder: $GPU_CHECK_OUT, else $OUT, else
# gpu-check-out/ (gpu-check.log holds it all, <step>.txt each step's output). Each step has
# its own time limit; a failed step does not stop the others, and the exit status is 1 if
# any failed. Without a CUDA GPU it prints one line and exits 0.
#
# --dry-run: every step on the CPU at tiny sizes (and five times the time limits), to
# prove the script before a GPU run.
# PYTHON: the interpreter (default .venv/bin/python if present, else python3).
set -u
cd "$(dirname "$0")/.."

dry_run=0
case "${1:-}" in
  "") ;;
  --dry-run) dry_run=1 ;;
  *) echo "gpu_check.sh: unknown argument '$1' (accepted: --dry-run)" >&2; exit 2 ;;
esac

python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
if ! cuda=$("$python" -c 'import torch; print(int(torch.cuda.is_available()))' 2>&1); then
  echo "gpu_check.sh: $python cannot import torch: ${cuda##*$'\n'}" >&2
  exit 2
fi
if [ "$dry_run" = 0 ] && [ "$cuda" != 1 ]; then
  echo "gpu-check: no GPU here (torch.cuda.is_available() is False for $python); nothing to run"
  exit 0
fi

# The package, importable without installing it (a GPU machine may have no network for
# pip): if lips_wrap.integrations is not importable, a view of lips_wrap/ with
# integrations/ inside goes first on PYTHONPATH, and Python runs with -P (3.11+: the
# current folder is not put first).
if ! "$python" -P -c 'import lips_wrap.integrations' 2>/dev/null; then
  view=$(mktemp -d)
  trap 'rm -rf "$view"' EXIT
  mkdir "$view/lips_wrap"
  ln -s "$PWD"/lips_wrap/* "$view/lips_wrap/"
  ln -s "$PWD/integrations" "$view/lips_wrap/integrations"
  export PYTHONPATH="$view${PYTHONPATH:+:$PYTHONPATH}"
  if ! "$python" -P -c 'import lips_wrap.integrations'; then
    echo "gpu_check.sh: cannot import lips_wrap with $python; pip install -e . first" >&2
    exit 2
  fi
fi

out="${GPU_CHECK_OUT:-${OUT:-gpu-check-out}}"
mkdir -p "$out"
exec > >(tee -a "$out/gpu-check.log") 2>&1
export TQDM_DISABLE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

# the dry run's limits are five times the GPU's: a shared CPU can be slow
if [ "$dry_run" = 1 ]; then
  device=cpu; scale=5; bench=(--quick --device cpu); slice=(--smoke --rounds 2 --device cpu)
else
  device=cuda; scale=1; bench=(--device cuda); slice=(--rounds 10 --device cuda)
fi
summary=()
failed=0

# step NAME SECONDS COMMAND...: run it under a time limit, output to the log and NAME.txt
step() {
  local name=$1 limit=$(($2 * scale)) start rc shown
  shift 2
  shown="$*"
  echo
  echo "== $name (limit ${limit}s): ${shown%%$'\n'*}"
  start=$SECONDS
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] && echo "== $name: stopped at its ${limit}s limit"
  [ "$rc" = 0 ] || failed=1
  summary+=("$(printf '%-28s exit %-4s %4ss' "$name" "$rc" $((SECONDS - start)))")
}

echo "gpu-check on $device, $(date -u '+%Y-%m-%d %H:%M UTC'), commit" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo unknown), output in $out/"
if [ "$dry_run" = 0 ]; then
  step nvidia-smi 20 nvidia-smi
fi
step torch 30 "$python" -c 'import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN",
      torch.backends.cudnn.version())
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_properties(i))'
step pytest-cuda 120 "$python" -P -m pytest -q -rs -m cuda -p no:cacheprovider \
  --continue-on-collection-errors --junitxml="$out/pytest-cuda.xml" tests
step mask_speed 80 "$python" benchmarks/mask_speed.py "${bench[@]}"
step step_overhead 75 "$python" benchmarks/step_overhead.py "${bench[@]}"
step memory 60 "$python" benchmarks/memory.py "${bench[@]}"
for setup in paper-cifar100-resnet8 paper-cifar10-vgg11; do
  step "slice-$setup" 110 "$python" benchmarks/reproduce.py --paper-slice "$setup" \
    "${slice[@]}" --out "$out/paper-slice"
done

echo
echo "== summary ($device, ${SECONDS}s in all)"
printf '%s\n' "${summary[@]}"
exit "$failed"
