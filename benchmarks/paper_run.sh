#!/bin/bash
# Codebook Features' TokFSM run, from scratch: the paper's GPT-NeoX and its k = 1 codebooks of 1,000 codes on every
# layer's attention heads and MLP output, trained together from random weights.  Rerun it to resume.
#   usage: benchmarks/paper_run.sh RUN [STEPS] [BATCH]      (defaults: runs/paper 3000 32; the paper used batch 512)
# RUN/init: the architecture and FSM (`toy train --preset paper`, 1 step: finetune --from-scratch re-draws the
# weights); RUN/fsm-train.txt: 100,000 walks; RUN/ft: the finetune; RUN/snapshots: every 100th checkpoint,
# scored by benchmarks/paper_curve.py RUN.
set -e
RUN=${1:-runs/paper}; STEPS=${2:-3000}; BATCH=${3:-32}
mkdir -p "$RUN"
[ -d "$RUN/init" ] || saekit toy train --preset paper --steps 1 --eval-seqs 4 --threads 1 --out "$RUN/init"
[ -f "$RUN/fsm-train.txt" ] || { saekit toy data --model "$RUN/init" --n-seq 100000 --seed 1 --out "$RUN/fsm-train.txt";
                                 rm -f "$RUN/fsm-train.labels.safetensors"; }
( mkdir -p "$RUN/snapshots"; while sleep 30; do            # keep every 100th checkpoint (the run keeps its last two)
    for d in "$RUN"/ft/checkpoints/joint/step-*; do
      [ -d "$d" ] || continue; n=$((10#${d##*step-}))
      [ $((n % 100)) -ne 0 ] || [ -d "$RUN/snapshots/step-$n" ] || { cp -r "$d" "$RUN/snapshots/step-$n.tmp" && mv "$RUN/snapshots/step-$n.tmp" "$RUN/snapshots/step-$n"; }
    done; done ) & SNAP=$!
trap 'kill $SNAP' EXIT
OMP_NUM_THREADS=1 saekit finetune --model "$RUN/init" --data "$RUN/fsm-train.txt" --packing doc --preset paper --from-scratch \
  --batch-size "$BATCH" --steps "$STEPS" --log-every 10 --checkpoint-every 50 --eval-sequences 256 --no-baseline --out "$RUN/ft" --resume
