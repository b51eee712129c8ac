#!/usr/bin/env bash
# Test perplexity of a trained DEQ-Transformer with fairseq-eval-lm, at the trained forward limit
# and hard-stopped at other limits (the paper's NFE column), with the segment memory (each of the
# --batch-size streams reads the text in order, every segment attending to the previous 300 tokens).
#
#   bash examples/wikitext103/eval.sh checkpoints/deq_transformer_lm_wt103/checkpoint_best.pt
set -euo pipefail
cd "$(dirname "$0")/../.."

CKPT=${1:-checkpoints/deq_transformer_lm_wt103/checkpoint_best.pt}
DATA=${DATA:-data-bin/wikitext-103}

for LIMIT in 12 30; do
    echo "== forward limit $LIMIT =="
    fairseq-eval-lm "$DATA" \
        --user-dir fairseq_deq \
        --task deq_language_modeling --tokens-per-sample 150 \
        --path "$CKPT" --gen-subset test --batch-size 10 \
        --model-overrides "{'eval_max_iter': $LIMIT}"
done
