#!/usr/bin/env bash
# GPU check: train, distill from two teachers, a 2-process DDP distill and export, on CUDA, with
# the real Fashion-MNIST. Prints what torch sees, then every command and its output.
#
#   bash benchmarks/gpu_check.sh [OUT]      (default OUT: runs/gpu_check)
#
# Environment: DEVICE (train.device, default cuda; DEVICE=cpu runs the same steps on the CPU),
# PY (default .venv/bin/python), DATA_ROOT (default the Debian package's Fashion-MNIST folder).
# The DDP run puts one GPU under each process; with fewer than two GPUs it says so and runs on
# the CPU (gloo) instead, since nccl refuses two processes on one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
DEVICE=${DEVICE:-cuda}
PY=${PY:-.venv/bin/python}
DATA_ROOT=${DATA_ROOT:-/usr/share/datasets/fashion-mnist}

rm -rf "$OUT"
mkdir -p "$OUT"
"$PY" -c '
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
for i in range(torch.cuda.device_count()):
    bf16 = torch.cuda.is_bf16_supported()
    print(f"GPU {i}: {torch.cuda.get_device_name(i)}, bf16: {bf16}")
'
bf16=true
[ "$DEVICE" = cpu ] && bf16=false
common=(
  "data.root=$DATA_ROOT" data.train_limit=4096 data.test_limit=1000 train.epochs=1
  "train.device=$DEVICE" "train.bf16=$bf16"
)
run() {
  echo "+ qatkd $*"
  "$PY" -m qatkd "$@"
}
run train "${common[@]}" model.name=resnet20 "out=$OUT/teacher_resnet20"
run train "${common[@]}" model.name=vgg8 "out=$OUT/teacher_vgg8"
run train "${common[@]}" model.name=resnet8 "out=$OUT/student_fp32"
distill=(
  quant.bits=W4A4 model.name=resnet8 "model.init=$OUT/student_fp32/last.pt"
  "teachers=[$OUT/teacher_resnet20/last.pt,$OUT/teacher_vgg8/last.pt]"
)
run distill "${common[@]}" "${distill[@]}" "out=$OUT/student_w4a4_gor"

gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
ddp_device=$DEVICE
if [ "$DEVICE" != cpu ] && [ "$gpus" -lt 2 ]; then
  echo "only $gpus GPU here: the 2-process DDP run trains on the CPU (gloo), not with nccl"
  ddp_device=cpu
fi
echo "+ torchrun --nproc_per_node=2 -m qatkd distill ... train.device=$ddp_device"
"$PY" -m torch.distributed.run --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=29531 \
  -m qatkd distill "${common[@]}" "${distill[@]}" "train.device=$ddp_device" \
  "out=$OUT/student_w4a4_gor_ddp"

run export "$OUT/student_w4a4_gor"
run eval --ckpt "$OUT/student_w4a4_gor"
echo "gpu check passed on train.device=$DEVICE (DDP: $ddp_device)"
