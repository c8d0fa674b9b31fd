"""The batch worker core on one GPU with the real SDXL architecture (random weights, bf16).

32 rows over 4 relations (real-shape relation LoRAs, 3.1M parameters each, random), 2 subjects per row, 1024x1024,
30 steps, CFG 5.0, planned and processed exactly as each Ray actor of ``dreamrelation batch submit`` does
(``batch.job.plan_chunks`` + ``batch.worker.Worker.process_and_write``), with real-architecture CLIP ViT-B/32 and
DINO ViT-S/16 (random weights) scoring every image. Ray itself is not used here: its wheel does not fit what can be
carried to the GPU machine. Prints images/s, the share of time in LoRA swaps, peak GPU memory, cache counters.

    python bench/batch_gpu.py                         # GPU
    python bench/batch_gpu.py --tiny --device cpu --size 64 --steps 2 --rows 8   # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

RELATIONS = ("hugging", "shaking_hands", "riding", "carrying")


def build_pipeline(tiny: bool, device: str, dtype: torch.dtype):
    from dreamrelation.model.adapter import ImagePromptAdapter
    from dreamrelation.model.config import AdapterConfig
    from dreamrelation.model.encoders import SubjectEncoder
    from dreamrelation.model.pipeline import DreamRelationPipeline

    if tiny:
        from dreamrelation.model.tiny import TINY_ADAPTER, build_tiny_components

        parts, cfg = build_tiny_components(), TINY_ADAPTER
        parts = {k: (v.to(device, dtype) if isinstance(v, torch.nn.Module) else v) for k, v in parts.items()}
    else:
        from dreamrelation.model.architectures import sdxl_components

        parts, cfg = sdxl_components(device=device, dtype=dtype), AdapterConfig()
    vision = parts.pop("image_encoder")
    with torch.device(device):
        adapter = ImagePromptAdapter(cfg, parts["unet"]).to(dtype)
    adapter.encoder = SubjectEncoder(vision, cfg.encoder)
    return DreamRelationPipeline(**parts, adapter=adapter)


def build_scorer(tiny: bool, device: str):
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from dreamrelation.metrics import MetricModels, build_tiny_metric_components
    from dreamrelation.model.tiny import build_tokenizer

    if tiny:
        m = build_tiny_metric_components()
        return MetricModels.from_models(m["clip"], m["tokenizer"], m["dino"], device=device)
    tok = build_tokenizer()
    with torch.device(device):
        clip = CLIPModel(CLIPConfig(  # ViT-B/32 + its text tower
            text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                             num_attention_heads=8, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=224, patch_size=32), projection_dim=512))
        dino = ViTModel(ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                                  num_attention_heads=6, image_size=224, patch_size=16), add_pooling_layer=False)
    return MetricModels.from_models(clip, tok, dino, device=device)


def make_loras(pipe, root: str) -> None:
    from dreamrelation.model.lora import add_relation_lora, save_relation_lora
    from manifests.registry import LoRARegistry

    registry = LoRARegistry(root)
    for i, relation in enumerate(RELATIONS):
        add_relation_lora(pipe.unet, relation)
        with torch.no_grad():
            for name, p in pipe.unet.named_parameters():
                if f".{relation}." in name and "lora_B" in name:
                    p.normal_(0.0, 0.01, generator=torch.Generator(p.device).manual_seed(i))
        with tempfile.TemporaryDirectory() as tmp:
            registry.register(relation, save_relation_lora(pipe.unet, relation, tmp))
        pipe.unet.delete_adapters(relation)


def make_rows(n: int, size: int, steps: int):
    from manifests.schema import GenerationRow

    subjects = sorted((ROOT / "manifests" / "examples" / "subjects").glob("*.png"))
    rows = []
    for i in range(n):
        a, b = subjects[i % len(subjects)], subjects[(i + 1) % len(subjects)]
        relation = RELATIONS[i % len(RELATIONS)]
        rows.append(GenerationRow(
            row_id=f"gpu-{i:03d}", prompt=f"a {a.stem} is {relation.replace('_', ' ')} a {b.stem}", relation=relation,
            subjects=[{"image": str(a), "phrase": a.stem, "box": [0.0, 0.2, 0.5, 0.9]},
                      {"image": str(b), "phrase": b.stem, "box": [0.5, 0.2, 1.0, 0.9]}],
            seed=i, steps=steps, width=size, height=size))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8, help="rows per actor call")
    ap.add_argument("--max-batch-images", type=int, default=4)
    ap.add_argument("--lora-cache-size", type=int, default=8)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype, dev = getattr(torch, args.dtype), args.device
    cuda = dev.startswith("cuda")

    from batch.job import plan_chunks
    from batch.worker import Worker, WorkerConfig

    work = Path(args.out or tempfile.mkdtemp())
    t = time.perf_counter()
    pipe = build_pipeline(args.tiny, dev, dtype)
    make_loras(pipe, str(work / "loras"))
    scorer = build_scorer(args.tiny, dev)
    build_s = time.perf_counter() - t
    config = WorkerConfig(output=str(work / "out"), loras=str(work / "loras"), device=dev, dtype=args.dtype,
                          max_batch_images=args.max_batch_images, lora_cache_size=args.lora_cache_size)
    worker = Worker(config, pipe=pipe, scorer=scorer)
    rows = make_rows(args.rows, args.size, args.steps)
    chunks = plan_chunks(rows, args.batch_size)
    # warm-up on one throw-away row (kernels, allocator) so that the timed run is the steady state
    worker.process([make_rows(1, args.size, 2)[0].model_copy(update={"row_id": "warmup", "relation": None})])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    results = []
    for chunk in chunks:
        results += worker.process_and_write([r.model_dump() for r in chunk])
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    ok = [r for r in results if r.status == "ok"]
    images = sum(len(r.images) for r in ok)
    stage = {k: sum(getattr(r, f"seconds_{k}") for r in results) for k in ("load", "lora", "generate", "write",
                                                                              "metrics")}
    stats = worker.stats()
    report = dict(
        device=torch.cuda.get_device_name() if cuda else dev, dtype=args.dtype, size=args.size, steps=args.steps,
        rows=len(rows), relations=len(RELATIONS), chunks=len(chunks), ok=len(ok), images=images,
        build_seconds=round(build_s, 1), wall_seconds=round(wall, 2), images_per_second=round(images / wall, 3),
        stage_seconds={k: round(v, 2) for k, v in stage.items()},
        lora_swap_share=round(stage["lora"] / wall, 4),
        lora_swaps=stats["lora_cache"]["swaps"], lora_swap_seconds=round(stats["lora_cache"]["swap_seconds"], 3),
        lora_cache=stats["lora_cache"], subject_cache=stats["subject_cache"],
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        errors=[r.error for r in results if r.status != "ok"][:3],
    )
    print(json.dumps(report, indent=2))
    print(f"\n{report['device']}: {images} images in {wall:.1f} s = {report['images_per_second']} images/s; "
          f"LoRA swaps {report['lora_swaps']} taking {100 * report['lora_swap_share']:.2f}% of the time; "
          f"peak {report['peak_gib']} GiB")
    if args.out:
        (work / "bench_batch_gpu.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
