#!/bin/sh
# Rebuild every shipped model from the corpora, in order, then docs/models.md:
#
#   sh training/build_all.sh            # from the repository root
#
# quill-base trains from scratch (30-60 min on one CPU core), then each genre LoRA adapter
# trains on top of the exported base (5-10 min each). Every step resumes from runs/<name>/ if it
# was interrupted; pass --fresh to start over. Logs: runs/<name>/log.jsonl.
set -eu
cd "$(dirname "$0")/.."
[ -f .venv/bin/activate ] && . .venv/bin/activate

# One thread: the build box is shared, and two torch threads collapse when anything else wants
# a core (docs/registry.md, "CPUs, threads and replicas"). jemalloc, when installed, keeps freed memory instead of handing
# the ~200 MB logits buffers back to the kernel every step (a third less system time here).
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
JEMALLOC=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
if [ -f "$JEMALLOC" ]; then
  export LD_PRELOAD="$JEMALLOC" MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1"
fi

for name in base legal copywriting lyrics fantasy abstracts; do
  python -m training.train --recipe "training/recipes/quill-$name.yaml" "$@"
done
python -m training.evaluate --matrix full --out docs/models.md
