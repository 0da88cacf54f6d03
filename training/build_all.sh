#!/bin/sh
# Rebuild every shipped model from the corpora, in order, then docs/models.md:
#
#   sh training/build_all.sh            # from the repository root
#
# 1. fits Quill's 8,192-token byte-level BPE on the corpora's train split (seconds),
# 2. trains quill-base from scratch (about 100 minutes on two cores with bf16; docs/models.md has
#    the time each step took on the build box),
# 3. trains each genre's LoRA adapter on top of the exported base (10-50 minutes each),
# 4. scores every model on the held-out split and writes docs/models.md.
# Every training step resumes from runs/<name>/ if it was interrupted; pass --fresh to start
# over. Logs: runs/<name>/log.jsonl. Extra arguments go to every `training.train` call.
set -eu
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate

# Every core this box has (training is the only thing the build does). jemalloc, when
# installed, keeps freed memory instead of handing the logits buffers back to the kernel every
# step (a third less system time here).
THREADS="${QUILL_TRAIN_THREADS:-$(nproc)}"
export OMP_NUM_THREADS="$THREADS" TOKENIZERS_PARALLELISM=false
JEMALLOC=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
if [ -f "$JEMALLOC" ]; then
  export LD_PRELOAD="$JEMALLOC" MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1"
fi

[ -f models/quill-tokenizer/tokenizer.json ] || python -m training.tokenizer --out models/quill-tokenizer
for name in base legal copywriting lyrics fantasy abstracts; do
  python -m training.train --recipe "training/recipes/quill-$name.yaml" --threads "$THREADS" "$@"
done
python -m training.evaluate --matrix full --out docs/models.md
