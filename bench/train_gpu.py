"""One relation-LoRA fine-tune step on the real SDXL architecture (random weights): seconds per step, peak memory.

bf16 autocast, 1024x1024, batch 1 per forward with gradient accumulation, the paper's loss profile (denoise + KML),
local tokens on, LoRA rank 4 (3.1M trainable parameters). Extrapolates the paper's recipe (500 steps of batch 8).

    python bench/train_gpu.py
    python bench/train_gpu.py --tiny --device cpu --resolution 64 --steps 2    # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from batch_gpu import build_pipeline  # noqa: E402


def synthetic_examples(n: int, size: int):
    from PIL import Image

    from dreamrelation.train.data import TripletExample

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = lambda: Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))  # noqa: E731
        boxes = np.array([[0.05, 0.2, 0.5, 0.9], [0.5, 0.2, 0.95, 0.9]], dtype=np.float32)
        out.append(TripletExample(
            target=img(), prompt="a dog is hugging a cat", relation_phrase="hugging", subject_images=[img(), img()],
            phrases=["dog", "cat"], boxes=boxes, target_masks=[None, None],
            target_keypoints=rng.uniform(0.1, 0.9, (2, 17, 2)).astype(np.float32),
            subject_keypoints=rng.uniform(0.1, 0.9, (2, 17, 2)).astype(np.float32), visibility=None,
            relation="hugging", triplet_id=f"s{i}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps to time (the first is a warm-up)")
    ap.add_argument("--accumulate", type=int, default=2, help="examples per optimizer step in this benchmark")
    ap.add_argument("--profile", default="paper")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    dev, cuda = args.device, args.device.startswith("cuda")

    from dreamrelation.model.config import TrainConfig
    from dreamrelation.train.training import train_relation_lora

    pipe = build_pipeline(args.tiny, dev, getattr(torch, args.dtype))
    examples = synthetic_examples(2, 256 if not args.tiny else 64)
    config = TrainConfig(relation="hugging", steps=args.steps, batch_size=args.accumulate,
                         resolution=args.resolution, profile=args.profile, checkpoint_every=10_000)
    times = []
    last = [time.perf_counter()]

    def tick(step: int, parts: dict) -> None:
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        print(json.dumps({"step": step, "seconds": round(times[-1], 3), **{k: round(v, 4) for k, v in parts.items()}}),
              flush=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        last[0] = time.perf_counter()
        result = train_relation_lora(pipe, examples, config, out, callback=tick)
    total = time.perf_counter() - t0
    steady = times[1:] or times
    per_example = float(np.mean(steady)) / args.accumulate
    report = dict(
        device=torch.cuda.get_device_name() if cuda else dev, dtype=args.dtype, resolution=args.resolution,
        profile=args.profile, trainable_parameters=sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad),
        accumulate=args.accumulate, seconds_per_step=round(float(np.mean(steady)), 3),
        seconds_per_example=round(per_example, 3),
        paper_recipe_hours=round(500 * 8 * per_example / 3600, 2),  # 500 steps x batch 8
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        total_seconds=round(total, 1), final_losses=result.card["final_losses"],
    )
    print(json.dumps(report, indent=2))
    print(f"\n{report['device']}: {report['seconds_per_example']} s per example (forward + backward at "
          f"{args.resolution} px); 500 steps x batch 8 = {report['paper_recipe_hours']} h; peak {report['peak_gib']} GiB")


if __name__ == "__main__":
    main()
