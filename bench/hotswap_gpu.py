"""Relation-LoRA swaps on a ``torch.compile``d UNet: hotswap (in place) against unload + load, tiny preset.

Loads the example relation LoRAs (manifests/examples/loras) through ``batch.cache.LoRACache`` into a pipeline whose
UNet is compiled, cycles relations, and reports the time per swap, the number of graphs dynamo compiled (hotswap
must not add any after the first pass), and that each relation's image equals the uncompiled pipeline's.

    python bench/hotswap_gpu.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from PIL import Image

    from batch.cache import LoRACache
    from dreamrelation.model.presets import load_pipeline
    from manifests.registry import LoRARegistry

    registry = LoRARegistry(str(ROOT / "manifests" / "examples" / "loras"))
    relations = registry.relations()
    subjects = [Image.open(ROOT / "manifests" / "examples" / "subjects" / f"{n}.png").convert("RGB")
                for n in ("dog", "cat")]
    call = dict(subject_images=subjects, subject_phrases=["dog", "cat"],
                boxes=[[0.0, 0.1, 0.5, 0.9], [0.5, 0.1, 1.0, 0.9]], seed=3, num_inference_steps=4, height=128,
                width=128, output_type="np", progress=False)

    def run(pipe, cache, relation):
        t = time.perf_counter()
        cache.activate(relation)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        swap = time.perf_counter() - t
        image = pipe("a dog is hugging a cat", relation=cache.relation_arg(relation), **call).images[0]
        return swap, image

    plain = load_pipeline("tiny", device=args.device)
    plain_cache = LoRACache(plain, registry, capacity=8, hotswap=False)
    reference = {r: run(plain, plain_cache, r)[1] for r in relations}
    plain_swaps = [run(plain, plain_cache, r)[0] for _ in range(args.rounds) for r in relations]

    compiled = load_pipeline("tiny", device=args.device)
    compiled.unet = torch.compile(compiled.unet)
    cache = LoRACache(compiled, registry, capacity=8)  # hotswap is chosen because the UNet is compiled
    import torch._dynamo.utils as dyn

    swaps, graphs, max_diff = [], [], 0.0
    for round_ in range(args.rounds + 1):
        for r in relations:
            swap, image = run(compiled, cache, r)
            if round_:  # round 0 compiles
                swaps.append(swap)
            max_diff = max(max_diff, float(np.abs(image - reference[r]).max()))
        graphs.append(int(dyn.counters["stats"]["unique_graphs"]))
    report = dict(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
                  relations=relations, hotswap=cache.stats()["hotswap"],
                  ms_per_swap_hotswap_compiled=round(1000 * float(np.mean(swaps)), 2),
                  ms_per_swap_unload_load=round(1000 * float(np.mean(plain_swaps)), 2),
                  dynamo_graphs_after_each_round=graphs, max_abs_diff_vs_uncompiled=max_diff)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
