#!/usr/bin/env bash
# Accuracy of a trained MDEQ when the forward solver is stopped after 2..14 steps (Table 3 shape).
set -euo pipefail
DATA=${1:?usage: $0 /path/to/imagenet CHECKPOINT [MODEL]}
CKPT=${2:?checkpoint path}
MODEL=${3:-mdeq_small}
python -m timm_deq.validate "$DATA" --model "$MODEL" --checkpoint "$CKPT" -b 64 --amp --amp-dtype bfloat16 \
  --eval-max-iter 2 4 6 8 10 12 14 --results-file "output/imagenet/${MODEL}_hard_stop.csv"
