#!/bin/bash
# The long-context quality grid of the README ("Long-context quality"): every task at 4K to 128K
# with the InfLLM cache (defaults) and, as the reference, with the stock cache up to the model's
# trained context (quality.py skips the longer lengths for it: 8K for SmolLM2, 32K for Gemma 3
# 270M), and the loss on the King James Bible.
#
# Tens of hours on two cores (the InfLLM cache evaluates 70-100 prompt tokens/s there): run it
# in the background. Every step is resumable, so running the script again continues where it
# stopped. The steps go in turn over the models, so the first pass over every cell of both
# models comes before the extra prompts. Results go to results/quality (SmolLM2) and
# results/quality-gemma3 (Gemma 3 270M): records.jsonl, ppl.jsonl, quality.md, eval.png.
#   nohup bash benchmarks/quality_grid.sh > quality_grid.log 2>&1 &
# Environment: PYTHON (default ../.venv/bin/python), MODELS (default "smollm2 gemma3"), STEPS
# (default "1 2 3 4"), CACHES (default full,infllm; "full" runs only the stock reference), NICE.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-../.venv/bin/python}
MODELS=${MODELS:-smollm2 gemma3}
STEPS=${STEPS:-1 2 3 4}
out_dir() { if [ "$1" = smollm2 ]; then echo results/quality; else echo "results/quality-$1"; fi; }
CACHES=${CACHES:-full,infllm}
q() { nice -n "${NICE:-0}" "$PY" quality.py --model "$model" --out "$(out_dir "$model")" --caches "$CACHES" "$@"; }

# SmolLM2 answers passkey and multikey in its window; multivalue, kv and vartrack it does not
# (0 with the stock cache at 4K), so past 8K those get one depth, enough to show that.
EASY=passkey,multikey
HARD=multivalue,kv,vartrack
D3=0.1,0.5,0.9
D5=0.1,0.3,0.5,0.7,0.9

step1() {  # a first pass over every cell, the shortest lengths first
  q --tasks $EASY --lengths 4096,8192 --depths $D3 --trials 2
  q --tasks $HARD --lengths 4096,8192 --depths $D3 --trials 1
  # one depth of every task first, in one call (the filler before depth 0.5 is shared); step 3
  # adds the other depths and trials of passkey and multikey
  q --tasks $EASY,$HARD --lengths 16384,32768 --depths 0.5 --trials 1
  q --lengths '' --ppl-contexts 4096,8192,16384,32768,65536
  # one depth first (a 128K prompt takes about half an hour); step 4 adds the others. One call
  # for both lengths: the filler before the first needle is shared across lengths too
  q --tasks $EASY --lengths 65536,131072 --depths 0.5 --trials 1
  q --tasks $HARD --lengths 65536 --depths 0.5 --trials 1
}
step2() {  # more prompts for the two tasks whose recall separates the caches in the window (the
           # share of the four values named; SmolLM2 names some but seldom all), where judged
  q --tasks multivalue,vartrack --lengths 8192,32768 --depths $D5 --trials 2
}
step3() {  # more prompts where the passkey and multikey goals are judged, to 32K
  q --tasks $EASY --lengths 4096,8192 --depths $D5 --trials 2
  q --tasks $EASY --lengths 16384,32768 --depths $D3 --trials 2
  q --tasks $EASY --lengths 16384,32768 --depths $D5 --trials 2
}
step4() {  # and at 64K and 128K (SmolLM2's first pass also ran depths 0.1 and 0.9 there)
  q --tasks $EASY --lengths 65536,131072 --depths $D5 --trials 1
}

for step in $STEPS; do
  for model in $MODELS; do
    echo "quality grid: step $step, $model"
    "step$step"
  done
done
echo "quality grid: done (steps $STEPS for $MODELS)"
