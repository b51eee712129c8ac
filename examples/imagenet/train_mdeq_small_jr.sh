#!/usr/bin/env bash
# MDEQ-small with Jacobian regularization on ImageNet (the paper's recipe: 74.5% top-1 at 14 NFE).
# 4 GPUs x 32 images, SGD (timm's "sgd" is Nesterov) lr 0.04, cosine, weight decay 2e-5, 100 epochs,
# Broyden forward/backward limited to 14 steps (reduced by a random 0-2 each step), absolute residual.
# The first 510k steps train a 5-layer weight-tied unrolled stack (JR weight 0.03); then the solver
# runs, with JR weight 2.5 at frequency 0.08, growing by 0.1 every 50k steps.
# The DEQ settings above are the model variant's defaults (timm_deq/models/mdeq.py): no flags needed.
# DATA is an ImageFolder root with train/ and validation/ (or val/) subfolders.
set -euo pipefail
DATA=${1:?usage: $0 /path/to/imagenet [extra timm_deq.train flags]}
shift
torchrun --nproc_per_node "${NPROC:-4}" -m timm_deq.train "$DATA" \
  --model mdeq_small -b 32 --opt sgd --momentum 0.9 --lr 0.04 --sched cosine --epochs 100 \
  --warmup-epochs 0 --weight-decay 2e-5 --smoothing 0.0 --amp --amp-dtype bfloat16 -j 12 \
  --output output/imagenet --experiment mdeq_small_jr "$@"
