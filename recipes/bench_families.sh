#!/usr/bin/env bash
# loracli vs transformers + PEFT (mixed batch) on a tiny random model of every supported family.
#   recipes/bench_families.sh [OUT] [extra loracli bench options...]
# Builds the models once (recipes/family_models.py) into OUT (default /tmp/loracli-families), then one
# `loracli bench` per family: 3 random adapters of ranks 8/16 on all of the family's LoRA targets,
# round-robin, float32 (greedy tokens of both systems must agree). On Qwen2-MoE and Qwen3-MoE the adapters
# target attention only: PEFT's mixed batches cannot run LoRA on their MLPs (Qwen2-MoE's shared
# expert sees flattened tokens; PEFT turns Qwen3-MoE's expert targets into parameter wrappers).
set -euo pipefail
out="${1:-/tmp/loracli-families}"
shift || true
here="$(cd "$(dirname "$0")" && pwd)"
[ -d "$out/qwen3_moe" ] || python "$here/family_models.py" "$out"
for family in llama qwen2 qwen3 gemma2 gemma3_text phi3 mixtral qwen2_moe qwen3_moe; do
  echo "== $family"
  case "$family" in
    qwen2_moe|qwen3_moe) targets=q_proj,k_proj,v_proj,o_proj ;;
    *) targets=all ;;
  esac
  loracli bench --model "$out/$family" --adapters 3 --ranks 8,16 --targets "$targets" --distribution round-robin \
    --prompts 64 --output-len 32 --threads 2 --dtype float32 --roofline-seconds 0 \
    --systems loracli,peft-mixed --json "$out/$family.json" "$@"
done
