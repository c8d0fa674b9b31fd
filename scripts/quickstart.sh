#!/usr/bin/env bash
# The main job with the embedded defaults (a local Ray, a local folder): the example toy manifest (16 rows: one to
# three coloured shapes acting out a relation, each with its subject images and layout boxes) through
# `dreamrelation batch submit` with the toy preset (a miniature model trained on the toy world, shipped in the
# package), then the toy world's oracle on the images it made (`batch judge`): how many show the right subjects
# and relation. The example manifest of the paper's relations, with relation LoRAs, runs the same way on the tiny
# preset (noise images): dreamrelation batch submit manifests/examples/example.parquet
# Usage: bash scripts/quickstart.sh [OUTPUT]      (default: outputs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-outputs/quickstart}"
dreamrelation batch submit manifests/examples/toy/manifest.parquet --preset toy --output "$out" --actors 2
dreamrelation batch judge "$out"
