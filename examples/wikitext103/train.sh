#!/usr/bin/env bash
# The paper's DEQ-Transformer on WikiText-103 (Bai, Koltun and Kolter, ICML 2021), multi-GPU.
#
# Everything the architecture fixes comes from --arch deq_transformer_lm_wt103 (post-LN; use
# ARCH=deq_transformer_lm_wt103_preln for the pre-LN variant): d 700, 10 heads, FFN 48000, adaptive
# input/softmax 20000/40000/200000 (factor 4, tied), dropout 0.06, attention dropout 0.01, weight
# norm, memory 300, Anderson 12 forward iterations (reduced by 0-2 at random), Broyden 13 backward,
# relative stop test, JR weight 1.9 (+0.1 every 35000 updates) at frequency 0.35 with one probe,
# 32000 pretraining updates of a 2-layer unrolled stack. Any of these can be changed with its flag
# (e.g. --jac-weight 0 trains the unregularized DEQ, --f-max-iter 30 the paper's slower baseline).
#
# This script sets the data and optimization recipe: segments of 150 tokens (--tokens-per-sample)
# streamed contiguously so the memory carries over (--task deq_language_modeling), 56 segments per
# update in all, Adam lr 2.5e-4 with 16000 warm-up updates and cosine decay over 300K updates.
#
#   NGPU=4 bash examples/wikitext103/train.sh            # 4 GPUs x 14 streams
#   NGPU=2 UPDATE_FREQ=2 bash examples/wikitext103/train.sh   # 2 GPUs x 14 streams x 2 accumulations
#
# fairseq starts one process per visible GPU (--distributed-world-size). --fp16 runs the model in
# half precision (the solvers keep float32 states); use --amp instead for autocast on float32 weights.
# --load-checkpoint-on-all-dp-ranks lets the run resume: fairseq otherwise sends the checkpoint to
# the other ranks through torch.load, which refuses fairseq's config in it (torch >= 2.6).
set -euo pipefail
cd "$(dirname "$0")/../.."

NGPU=${NGPU:-4}
UPDATE_FREQ=${UPDATE_FREQ:-1}
ARCH=${ARCH:-deq_transformer_lm_wt103}
DATA=${DATA:-data-bin/wikitext-103}
SAVE=${SAVE:-checkpoints/$ARCH}
STREAMS=$((56 / NGPU / UPDATE_FREQ))     # per GPU and micro-batch: 56 segments per update in all

fairseq-train "$DATA" \
    --user-dir fairseq_deq \
    --task deq_language_modeling --tokens-per-sample 150 --sample-break-mode none \
    --arch "$ARCH" \
    --criterion adaptive_loss_jr --ddp-backend legacy_ddp \
    --distributed-world-size "$NGPU" --batch-size "$STREAMS" --update-freq "$UPDATE_FREQ" \
    --batch-size-valid 10 \
    --optimizer adam --adam-betas '(0.9, 0.999)' --adam-eps 1e-8 --clip-norm 0.25 \
    --lr 2.5e-4 --lr-scheduler cosine --warmup-updates 16000 --warmup-init-lr 1e-7 --min-lr 0 \
    --max-update 300000 \
    --fp16 \
    --save-dir "$SAVE" --save-interval-updates 10000 --keep-interval-updates 3 \
    --load-checkpoint-on-all-dp-ranks \
    --validate-interval-updates 10000 --log-format simple --log-interval 200 \
    --tensorboard-logdir "$SAVE/tensorboard" \
    "$@"
