#!/usr/bin/env bash
# The main job with the embedded defaults: the example manifest (18 rows, 3 relations, 1-3 subjects) through
# `dreamrelation batch submit` on a local Ray, with the built-in tiny model and the example relation LoRAs.
# Usage: bash scripts/quickstart.sh [OUTPUT]      (default: outputs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-outputs/quickstart}"
dreamrelation batch submit manifests/examples/example.parquet --output "$out" --actors 2
