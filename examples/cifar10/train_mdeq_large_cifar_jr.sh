#!/usr/bin/env bash
# The paper's CIFAR-10 MDEQ with JR (93.1% at 6 NFE in the paper).
# Adam lr 1e-3, cosine, no weight decay, batch 96, 220 epochs; Broyden 8 forward / 7 backward steps
# (forward limit reduced by a random 0-2), relative residual; 16k steps of an 8-layer unrolled stack
# first; JR weight 0.4 at frequency 0.02, switched off from epoch 90.
# The DEQ settings above are the model variant's defaults (timm_deq/models/mdeq.py): no flags needed.
# DATA is an ImageFolder of CIFAR-10 (train/ and validation/ or test/ subfolders of class folders);
# torchvision's copy also works with --dataset torch/cifar10 when it is already on disk.
set -euo pipefail
DATA=${1:?usage: $0 /path/to/cifar10 [extra timm_deq.train flags]}
shift
torchrun --nproc_per_node "${NPROC:-1}" -m timm_deq.train "$DATA" \
  --model mdeq_large_cifar -b 96 --opt adam --lr 1e-3 --weight-decay 0 --sched cosine --epochs 220 \
  --warmup-epochs 0 --smoothing 0.0 --scale 0.6 1.0 --hflip 0.5 --color-jitter 0 -j 4 \
  --output output/cifar10 --experiment mdeq_large_cifar_jr "$@"
