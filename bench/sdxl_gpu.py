"""Plain diffusers SDXL against DreamRelationPipeline (2 subjects) on the same machine, same run.

The real SDXL architecture (2.6B UNet, both CLIP text encoders, CLIP ViT-bigG image encoder, the real-size
adapter: Resampler + 70 image cross-attention projections) with random weights: timings and memory are those of
the real model, the images are noise. Prints a Markdown table and writes bench_sdxl_gpu.json to --out.

    python bench/sdxl_gpu.py                                  # GPU: bf16, 1024x1024, 30 steps, CFG, batch 1 and 4
    python bench/sdxl_gpu.py --tiny --device cpu --size 64 --steps 2   # smoke test of the script on a CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, device: str) -> tuple[float, float]:
    """(seconds, peak GiB allocated) of one call."""
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--tiny", action="store_true", help="tiny components instead of the real architecture")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    dev = args.device

    from diffusers import StableDiffusionXLPipeline

    from dreamrelation.model.adapter import ImagePromptAdapter
    from dreamrelation.model.config import AdapterConfig
    from dreamrelation.model.encoders import SubjectEncoder
    from dreamrelation.model.pipeline import DreamRelationPipeline

    t0 = time.perf_counter()
    if args.tiny:
        from dreamrelation.model.tiny import TINY_ADAPTER, build_tiny_components

        parts, adapter_cfg = build_tiny_components(), TINY_ADAPTER
        parts = {k: (v.to(dev, dtype) if isinstance(v, torch.nn.Module) else v) for k, v in parts.items()}
    else:
        from dreamrelation.model.architectures import sdxl_components

        parts, adapter_cfg = sdxl_components(device=dev, dtype=dtype), AdapterConfig()
    build_s = time.perf_counter() - t0
    image_encoder = parts.pop("image_encoder")
    weights_gib = sum(p.numel() * p.element_size() for m in parts.values() if isinstance(m, torch.nn.Module)
                      for p in m.parameters()) / 2**30
    info = dict(device=torch.cuda.get_device_name() if dev.startswith("cuda") else dev, dtype=args.dtype,
                size=args.size, steps=args.steps, guidance=args.guidance, torch=torch.__version__,
                build_seconds=round(build_s, 1), sdxl_weights_gib=round(weights_gib, 2))
    print(json.dumps(info), flush=True)

    prompt = "a dog is hugging a cat in front of the mountain"
    common = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.size, width=args.size)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []

    # 1. plain diffusers SDXL (before the adapter's processors are installed on the shared UNet)
    plain = StableDiffusionXLPipeline(**parts, add_watermarker=False)
    plain.set_progress_bar_config(disable=True)
    plain([prompt], num_inference_steps=2, guidance_scale=args.guidance, height=args.size, width=args.size)  # warm-up
    for b in batches:
        gen = [torch.Generator("cpu").manual_seed(i) for i in range(b)]
        s, peak = measure(lambda: plain([prompt] * b, generator=gen, **common), dev)
        rows.append(dict(pipeline="diffusers StableDiffusionXLPipeline", batch=b, seconds=s, images_per_s=b / s,
                         peak_gib=peak))
        print(json.dumps(rows[-1]), flush=True)

    # 2. DreamRelation: real-size adapter (Resampler 118.9M + 70 image projections) and the bigG subject encoder
    with torch.device(dev):
        adapter = ImagePromptAdapter(adapter_cfg, parts["unet"]).to(dtype)
    adapter.encoder = SubjectEncoder(image_encoder, adapter_cfg.encoder)
    pipe = DreamRelationPipeline(**parts, adapter=adapter)
    subjects = [Image.new("RGB", (512, 512), c) for c in ((200, 80, 40), (40, 80, 200))]
    boxes = [[0.0, 0.2, 0.5, 0.9], [0.5, 0.2, 1.0, 0.9]]
    pipe(prompt, subjects, ["dog", "cat"], boxes, num_inference_steps=2, guidance_scale=args.guidance,
         height=args.size, width=args.size, progress=False)  # warm-up
    enc_s, enc_peak = measure(lambda: pipe.encode_subjects(subjects), dev)
    for b in batches:
        s, peak = measure(lambda: pipe([prompt] * b, [subjects] * b, [["dog", "cat"]] * b, [boxes] * b,
                                       seed=list(range(b)), progress=False, **common), dev)
        rows.append(dict(pipeline="DreamRelationPipeline (2 subjects, local tokens)", batch=b, seconds=s,
                         images_per_s=b / s, peak_gib=peak))
        print(json.dumps(rows[-1]), flush=True)

    print(f"\nsubject encoding (2 images, bigG at {adapter_cfg.encoder.image_size} px + local tokens at "
          f"{adapter_cfg.encoder.local_image_size} px): {enc_s * 1000:.0f} ms, peak {enc_peak:.1f} GiB")
    print(f"\n{info['device']}, {args.dtype}, {args.size}x{args.size}, {args.steps} steps, CFG {args.guidance}\n")
    print("| pipeline | batch | s / batch | images / s | peak GiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pipeline']} | {r['batch']} | {r['seconds']:.2f} | {r['images_per_s']:.3f} | {r['peak_gib']:.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_sdxl_gpu.json").write_text(json.dumps(dict(info=info, rows=rows, encode_seconds=enc_s), indent=2))


if __name__ == "__main__":
    main()
