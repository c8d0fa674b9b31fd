"""Write the example relation LoRAs of the tiny model (hugging, shaking_hands, riding) into a LoRA registry.

    python scripts/make_example_loras.py [ROOT]      # default: manifests/examples/loras

Random, deterministic LoRA weights in the diffusers format (``{root}/{relation}/pytorch_lora_weights.safetensors``):
they make each relation change the tiny model's output, so the batch job's LoRA path is exercised end to end.
They are not trained; train real ones with ``dreamrelation train relations``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RELATIONS = ("hugging", "shaking_hands", "riding")


def main(root: Path) -> list[str]:
    import torch

    from dreamrelation.model.lora import add_relation_lora, save_relation_lora
    from dreamrelation.model.presets import load_pipeline
    from manifests.registry import LoRARegistry

    pipe = load_pipeline("tiny")
    registry = LoRARegistry(str(root))
    written = []
    for i, relation in enumerate(RELATIONS):
        add_relation_lora(pipe.unet, relation)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in pipe.unet.named_parameters():
                if f".{relation}." in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "lora_B" in name else 0.5))
        with tempfile.TemporaryDirectory() as tmp:
            path = save_relation_lora(pipe.unet, relation, tmp)
            written.append(registry.register(relation, path, card={"relation": relation, "base_model": "tiny",
                                                                   "note": "random example weights, not trained"}))
        pipe.unet.delete_adapters(relation)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "manifests" / "examples" / "loras"
    for uri in main(target):
        print(uri)
