#!/usr/bin/env bash
# WikiText-103 for fairseq: download the word-level corpus and binarize it with fairseq-preprocess.
# Result: data-bin/wikitext-103 (dictionary of about 268K words). Run from anywhere; paths are
# relative to the repository root. Needs about 1 GB of disk and a few minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."

RAW=${RAW:-data/wikitext-103}
DEST=${DEST:-data-bin/wikitext-103}
URL=https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip

mkdir -p "$(dirname "$RAW")"
if [ ! -f "$RAW/wiki.train.tokens" ]; then
    wget -c -O "$(dirname "$RAW")/wikitext-103-v1.zip" "$URL"
    unzip -o -d "$(dirname "$RAW")" "$(dirname "$RAW")/wikitext-103-v1.zip"
fi

# The corpus is already tokenized (<unk> for rare words): keep every word, one stream of text.
fairseq-preprocess --only-source \
    --trainpref "$RAW/wiki.train.tokens" \
    --validpref "$RAW/wiki.valid.tokens" \
    --testpref "$RAW/wiki.test.tokens" \
    --destdir "$DEST" --workers "${WORKERS:-16}"
