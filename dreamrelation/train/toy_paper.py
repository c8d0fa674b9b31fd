"""The paper in miniature: relation LoRAs on the toy preset's held-out relation, judged by the toy world's oracle.

The toy preset (``dreamrelation.train.toy_model``) never saw one relation (its card's ``held_out``). Here relation
LoRAs learn it from a handful of triplets (the paper's setting: a few exemplar images per relation) through the
real fine-tuning path (``train_relation_lora``), with and without KML and local tokens, and every configuration
generates the same held-out cases: the oracle says whether each image shows the asked identities (identity
accuracy; "shape + colour" leaves the pattern aside) and whether the relation holds among them (relation accuracy).
Rates come with 95% Wilson intervals.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..toy import world
from .data import TripletExample

logger = logging.getLogger(__name__)

# name -> (profile, use_local_tokens); None: the model without a LoRA
CONFIGS: dict[str, tuple[str, bool] | None] = {
    "base": None,
    "lora_no_kml": ("no-kml", True),
    "lora_kml": ("paper", True),
    "lora_no_kml_no_local": ("no-kml", False),
    "lora_kml_no_local": ("paper", False),
}
TABLE_FILE = "paper_in_miniature.md"
JSON_FILE = "paper_in_miniature.json"


@dataclass(frozen=True)
class PaperSettings:
    triplets: int = 5  # training triplets of the held-out relation
    steps: int = 200
    batch_size: int = 4
    learning_rate: float = 5e-4
    rank: int = 4
    kml_weight: float | None = None  # None: the profile's (paper: 1e-3)
    cases: int = 100  # held-out cases each configuration generates
    seed: int = 0
    sampling_steps: int = 25
    guidance: float = 5.0

    def __post_init__(self) -> None:
        for name in ("triplets", "steps", "batch_size", "rank", "cases", "sampling_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


def toy_example(render: world.Render, triplet_id: str = "") -> TripletExample:
    """A render as a fine-tuning triplet: the render as target, each identity's portrait as its subject image,
    masks, keypoints (the world's "points" layout) and visibilities."""
    shots = [world.portrait(i, render.layout.size) for i in render.identities]
    return TripletExample(
        target=render.image, prompt=render.caption, relation_phrase=render.relation.phrase,
        subject_images=tuple(image for image, _ in shots), phrases=tuple(i.phrase for i in render.identities),
        boxes=render.boxes, target_masks=tuple(render.masks), target_keypoints=render.keypoints,
        subject_keypoints=np.stack([kp for _, kp in shots]), visibility=render.visibility,
        relation=render.relation.id, triplet_id=triplet_id,
        keypoint_layouts=(world.KEYPOINT_LAYOUT,) * len(render.identities))


def _lora_name(relation: str, config: str) -> str:
    return f"{relation}__{config}"


def run_paper(preset: str, output: str | Path, settings: PaperSettings = PaperSettings(),
              configs: tuple[str, ...] = tuple(CONFIGS), held_out: str | None = None,
              progress: Callable[[str], None] | None = None,
              on_step: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Train the LoRAs of ``configs`` on ``settings.triplets`` triplets of the preset's held-out relation (its
    ``card.json``, or ``held_out``), generate ``settings.cases`` held-out cases with each configuration and judge
    them; writes ``{output}/paper_in_miniature.{md,json}`` and each LoRA under ``{output}/loras/``. Returns the
    JSON's content. ``progress(line)`` hears each stage; ``on_step(config, step, steps)`` each LoRA step."""
    from ..model.config import TrainConfig
    from ..model.presets import load_pipeline, resolve_spec
    from .toy_model import TOY_SIZE, measure
    from .training import train_relation_lora

    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise ValueError(f"configs must be names from {list(CONFIGS)}, got {unknown}")
    folder = Path(resolve_spec(preset).base)
    card = json.loads((folder / "card.json").read_text()) if (folder / "card.json").is_file() else {}
    relation = held_out or (card.get("data") or {}).get("held_out")
    if relation is None:
        raise ValueError(f"preset {preset!r} has no card.json naming its held-out relation: pass held_out")
    world.relation(relation)
    output = Path(output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda line: logger.info("%s", line))
    examples = [toy_example(world.scene(relation, seed=10**7 + settings.seed * 1000 + i), f"toy-{i:05d}")
                for i in range(settings.triplets)]
    pipe = load_pipeline(preset)
    pipe.set_progress_bar_config(disable=True)
    results: dict[str, Any] = {}
    for name in configs:
        spec = CONFIGS[name]
        t0 = time.perf_counter()
        lora, local = None, None
        if spec is not None:
            profile, local = spec
            lora = _lora_name(relation, name)
            config = TrainConfig(relation=lora, steps=settings.steps, learning_rate=settings.learning_rate,
                                 batch_size=settings.batch_size, resolution=TOY_SIZE, rank=settings.rank,
                                 profile=profile, checkpoint_every=settings.steps, seed=settings.seed,
                                 use_local_tokens=local, kml_weight=settings.kml_weight)
            say(f"{name}: training the LoRA ({settings.steps} steps x {settings.batch_size})")
            step_done = None if on_step is None else (lambda step, _parts, n=name: on_step(n, step, settings.steps))
            train_relation_lora(pipe, examples, config, output / "loras" / name, callback=step_done,
                                base_model=str(preset))
        say(f"{name}: generating {settings.cases} held-out cases")
        measured = measure(pipe, [relation], settings.cases, seed=settings.seed + 2, adapter=True,
                           steps=settings.sampling_steps, guidance=settings.guidance, relation=lora,
                           use_local_tokens=local)
        results[name] = dict(measured, profile=spec[0] if spec else None, local_tokens=local if spec else None,
                             seconds=round(time.perf_counter() - t0, 1))
    report = dict(preset=str(preset), held_out=relation, settings=asdict(settings), results=results)
    (output / JSON_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (output / TABLE_FILE).write_text(table(report))
    return report


def table(report: dict[str, Any]) -> str:
    """The markdown table of a :func:`run_paper` report: one row per configuration, rates in % with intervals."""
    s = report["settings"]
    lines = [f"# The paper in miniature: held-out relation `{report['held_out']}` on preset `{report['preset']}`",
             "",
             f"{s['triplets']} training triplets; LoRA rank {s['rank']}, {s['steps']} steps x batch "
             f"{s['batch_size']}, lr {s['learning_rate']}; {next(iter(report['results'].values()))['cases']} "
             f"held-out cases per configuration, {s['sampling_steps']} sampling steps, guidance {s['guidance']}. "
             "Judged by the toy world's oracle; [95% Wilson interval].",
             "",
             "| configuration | KML | local tokens | identity accuracy | shape + colour | relation accuracy | both |",
             "|---|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        kml = "-" if r["profile"] is None else ("no" if r["profile"] == "no-kml" else "yes")
        local = "-" if r["local_tokens"] is None else ("yes" if r["local_tokens"] else "no")
        cells = [f"{100 * r[k]['rate']:.1f}% [{100 * r[k]['ci95'][0]:.1f}, {100 * r[k]['ci95'][1]:.1f}]"
                 for k in ("identity", "shape_colour", "relation", "both")]
        lines.append(f"| {name} | {kml} | {local} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
