#!/usr/bin/env bash
# The quickstart main job on the built-in tiny preset: two example subjects, one relation, a layout.
# Usage: bash scripts/quickstart.sh [OUTPUT_DIR]      (default: outputs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-outputs/quickstart}"
ex=manifests/examples/subjects
dreamrelation generate --preset tiny \
  --prompt "a dog is hugging a cat" \
  --subject "$ex/dog.png" --phrase dog --box 0.05,0.2,0.55,0.95 \
  --subject "$ex/cat.png" --phrase cat --box 0.45,0.15,0.95,0.9 \
  --num-images 2 --steps 10 --output "$out"
echo "images and generation.json in $out"
