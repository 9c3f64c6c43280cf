#!/usr/bin/env bash
# The main job on a built-in small default, from a fresh machine (a few minutes on 2 CPU cores):
#   1. install into .venv (tools/install.sh; reused when present);
#   2. write an offline sample corpus (standard-library docstrings, no download);
#   3. train an 8k sentencepiece BPE tokenizer on it;
#   4. preprocess it into a megatron-core indexed dataset;
#   5. train a tiny Qwen3-style model with the shaped loss (beta=-0.25, k=100, lambda_tail=-0.1)
#      on 2 ranks with tensor parallelism (TP=2, gloo on CPU), printing the metrics, validating,
#      and saving checkpoints;
#   6. plot cross-entropy and entropy over the steps (PNG).
# Running it again resumes an unfinished run (its latest checkpoint) or, once the run is
# complete, starts the next run folder (run-2, run-3, ...): nothing is overwritten.
# Extra arguments are config overrides for step 5, e.g. `bash tools/quickstart.sh train.steps=200`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/install.sh
PY=.venv/bin/python
WORK=${QUICKSTART_DIR:-quickstart}
DATA=$WORK/data
mkdir -p "$DATA"

echo "== 1/5 sample corpus: $DATA/corpus.jsonl"
[ -s "$DATA/corpus.jsonl" ] || $PY -m megatron_ntp.data.sample_corpus --out "$DATA/corpus.jsonl" --size 4MB
echo "== 2/5 tokenizer: $DATA/spm8k.model"
[ -s "$DATA/spm8k.model" ] || $PY tools/train_tokenizer.py --input "$DATA/corpus.jsonl" \
    --model-prefix "$DATA/spm8k" --vocab-size 8000
echo "== 3/5 preprocessing: $DATA/corpus_text_document.{bin,idx}"
[ -s "$DATA/corpus_text_document.idx" ] || $PY tools/preprocess_data.py --input "$DATA/corpus.jsonl" \
    --output-prefix "$DATA/corpus" --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$DATA/spm8k.model" --append-eod --workers 2

STEPS=100
for arg in "$@"; do case "$arg" in train.steps=*) STEPS=${arg#train.steps=} ;; esac; done
# The run folder: the first run-N that is not complete; an existing one is resumed only when it
# holds a checkpoint to resume from, otherwise (e.g. it died before its first save) it is left
# as it is and the next N is used.
n=1
while :; do
  RUN=$WORK/run-$n
  latest=$RUN/checkpoints/latest_checkpointed_iteration.txt
  if [ ! -e "$RUN" ]; then break; fi
  if [ -s "$latest" ] && [ "$(cat "$latest")" -lt "$STEPS" ]; then
    echo "== resuming $RUN from iteration $(cat "$latest")"; break
  fi
  n=$((n + 1))
done
echo "== 4/5 training on 2 ranks: $RUN"
# One thread per rank (2 ranks on 2 cores): what torchrun would choose, said here so that it does
# not print its multi-line notice about choosing it.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/torchrun --nproc_per_node=2 -m megatron_ntp.cli train \
    --config examples/configs/tiny_dense.yaml \
    data.blend="$DATA/corpus_text_document" data.tokenizer_model="$DATA/spm8k.model" \
    parallel.tensor=2 parallel.sequence_parallel=true \
    loss.beta=-0.25 loss.topk=100 loss.lambda_tail=-0.1 \
    train.steps="$STEPS" train.eval_interval=25 train.eval_steps=2 \
    checkpoint.save_dir="$RUN/checkpoints" checkpoint.save_interval=50 \
    logging.run_dir="$RUN" "$@"
echo "== 5/5 plot"
$PY -m megatron_ntp.plots "$RUN" --out "$RUN/curves.png"  # titled from $RUN/config.yaml
echo "done ($($PY -m megatron_ntp.plots "$RUN" --describe)): metrics $RUN/metrics.jsonl, validation $RUN/valid.jsonl, checkpoints $RUN/checkpoints, plot $RUN/curves.png"
