"""The dataset card of an export: the facts (counts, relations, metric distributions, model and LoRA versions,
filters) as a dict, and ``README.md``: a YAML header the Hugging Face Hub and ``datasets`` read, then the facts for
people. COCO exports keep the same facts in ``annotations.json``'s ``info``.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Optional

import yaml

from manifests.export_samples import METRICS, ExportFilter, RunSamples, Sample, locate
from manifests.registry import LoRARegistry

logger = logging.getLogger(__name__)

__all__ = ["TINY_WARNING", "card_facts", "lora_versions", "metric_stats", "render_card"]

TITLE = "DreamRelation synthetic relation dataset"
TINY_WARNING = ("Made with the `tiny` preset: random miniature weights. The images are noise and the metrics say "
                "nothing about quality; this export only shows that every step of the pipeline ran.")
RUN_COUNTS = ("read", "accepted", "rejected", "ok", "error", "images", "gate")
FIELDS = {
    "image": "the generated image (PNG)",
    "key": "`{row_id}_{k}` ('.' in the row id replaced by '~'): the sample's name in every format",
    "row_id, k": "the manifest row and the image index within the row",
    "prompt": "the generation prompt",
    "seed": "the seed of this image (the row's seed + k; under the quality gate, the seed of its final attempt)",
    "relation": "relation id (the relation LoRA's name); null: generated without a relation LoRA",
    "relation_phrase": "the relation words CLIP-R scores",
    "subject_phrases": "one phrase per subject",
    "boxes": "the layout box of each subject (normalized xyxy in [0, 1]), as given to the generator: where the "
             "subject was asked to appear, not a detection",
    "boxes_pixel": "the same boxes in pixels (xyxy)",
    "width, height": "image size in pixels",
    "clip_t, clip_r, clip_i, clip_i_crop, dino": "per-image scores x100 (CLIP-I / DINO: mean over subjects); "
                                                 "null when not computed",
    "gate": "the row's quality-gate outcome (passed / failed); null when the run had no gate",
}


def metric_stats(samples: list[Sample]) -> dict[str, dict[str, float]]:
    """{metric: {n, mean, std (population), min, median, max}} over the samples that have the metric."""
    out = {}
    for metric in METRICS:
        values = [s.metrics[metric] for s in samples if s.metrics.get(metric) is not None]
        if values:
            out[metric] = {"n": len(values), "mean": round(statistics.fmean(values), 3),
                           "std": round(statistics.pstdev(values), 3), "min": round(min(values), 3),
                           "median": round(statistics.median(values), 3), "max": round(max(values), 3)}
    return out


def _configuration(run: dict[str, Any], key: str) -> Any:
    config = run.get("configuration") or {}
    value = config.get(key)
    return value if value is not None else (config.get("worker") or {}).get(key)


def lora_versions(output: str, loras: Optional[str], relations: list[str]) -> dict[str, dict[str, Any]]:
    """{relation: {"uri", "fingerprint", "card"}} from the run's LoRA registry; {"error": ...} for a relation whose
    LoRA cannot be read now (the registry may have moved since the run)."""
    if not relations:
        return {}
    root = locate(output, loras) if loras else None
    if root is None:
        why = "the run recorded no LoRA registry" if not loras else f"the LoRA registry {loras!r} is not readable"
        return {r: {"error": why} for r in relations}
    registry = LoRARegistry(root)
    out = {}
    for relation in relations:
        try:
            out[relation] = {"uri": registry.uri(relation), "fingerprint": registry.fingerprint(relation),
                             "card": registry.card(relation)}
        except Exception as e:  # noqa: BLE001 - a card still gets written; the reason is recorded instead
            out[relation] = {"error": f"{type(e).__name__}: {e}"}
    return out


def card_facts(found: RunSamples, samples: list[Sample], format: str, to: str, filters: ExportFilter,
               missing_images: int) -> dict[str, Any]:
    """The facts of an export of ``samples`` (those written) from the run ``found``, as plain JSON values."""
    by_relation: dict[Optional[str], dict[str, Any]] = defaultdict(lambda: {"samples": 0, "rows": set(),
                                                                            "phrases": defaultdict(int)})
    for s in samples:
        entry = by_relation[s.relation]
        entry["samples"] += 1
        entry["rows"].add(s.row_id)
        entry["phrases"][s.relation_phrase] += 1
    relations = [{"relation": r, "samples": e["samples"], "rows": len(e["rows"]),
                  "phrases": {str(p): n for p, n in sorted(e["phrases"].items(), key=lambda kv: (-kv[1], str(kv[0])))}}
                 for r, e in sorted(by_relation.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))]
    preset = _configuration(found.run, "preset")
    loras = _configuration(found.run, "loras")
    filtered = dict(sorted(found.filtered_out.items()))
    return {
        "title": TITLE,
        "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_run": found.output, "manifest": found.manifest, "format": format, "destination": to,
        "samples": len(samples), "rows": len({s.row_id for s in samples}), "relations": relations,
        "metrics": metric_stats(samples),
        "model": {"preset": preset, "loras": loras,
                  "lora_versions": lora_versions(found.output, loras, [r["relation"] for r in relations
                                                                      if r["relation"] is not None])},
        "filters": filters.describe(),
        "images_in_run": found.images, "filtered_out": filtered, "missing_images": missing_images,
        "rows_in_run": found.rows_read, "rows_error": found.rows_error,
        "run": {k: found.run[k] for k in RUN_COUNTS if k in found.run},
        "tiny_preset": preset == "tiny",
    }


_LOADING = {
    "hf": "```python\nimport datasets\nds = datasets.load_dataset(\"{to}\", split=\"train\")  # images as PIL\n```",
    "webdataset": "```python\nimport webdataset as wds\nds = wds.WebDataset([...shard-000000.tar, ...]).decode(\"pil\")"
                  "\n# each item: {{\"__key__\", \"png\", \"json\"}}\n```",
    "coco": "`annotations.json` is COCO detection JSON (`bbox` pixel `[x, y, width, height]`, one category per "
            "subject phrase, the relation in each annotation's `attributes`); `file_name` is relative to "
            "`images/`.",
}


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v).replace("|", "\\|") for v in row) + " |"
              for row in rows]
    return "\n".join(lines)


def render_card(facts: dict[str, Any], header: dict[str, Any]) -> str:
    """``README.md``: YAML header (``header`` holds the layout's ``configs`` / ``dataset_info``), then the body."""
    meta = {"pretty_name": facts["title"], "tags": ["synthetic", "dreamrelation", "relation"],
            "task_categories": ["text-to-image", "object-detection"], **header}
    parts = ["---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---", f"# {facts['title']}"]
    if facts["tiny_preset"]:
        parts.append(f"> **Warning**: {TINY_WARNING}")
    parts.append(f"Exported from the batch run `{facts['source_run']}` (rows from `{facts['manifest']}`) by "
                 f"`dreamrelation batch export --format {facts['format']}` on {facts['date_created']}.")
    parts.append("## Loading\n\n" + _LOADING[facts["format"]].format(to=facts["destination"]))
    parts.append("## Counts\n\n" + _table(["samples", "rows", "relations"],
                                          [[facts["samples"], facts["rows"], len(facts["relations"])]]))
    parts.append("## Relations\n\n" + _table(
        ["relation", "relation phrases (samples)", "rows", "samples"],
        [[f"`{r['relation']}`" if r["relation"] else "(none: no relation LoRA)",
          "; ".join(f"{p} ({n})" for p, n in r["phrases"].items()), r["rows"], r["samples"]]
         for r in facts["relations"]]))
    metrics = facts["metrics"]
    parts.append("## Metric distributions (x100)\n\n" + (_table(
        ["metric", "n", "mean", "std", "min", "median", "max"],
        [[m, v["n"], v["mean"], v["std"], v["min"], v["median"], v["max"]] for m, v in metrics.items()])
        if metrics else "No metrics were computed in this run."))
    model = facts["model"]
    lines = [f"- preset: `{model['preset']}`", f"- LoRA registry: `{model['loras']}`"]
    versions = model["lora_versions"]
    text = "\n".join(lines)
    if versions:
        text += "\n\n" + _table(["relation", "fingerprint", "card"],
                                [[f"`{r}`", v.get("fingerprint") or v.get("error"),
                                  json.dumps(v["card"], sort_keys=True) if v.get("card") else ""]
                                 for r, v in versions.items()])
    parts.append("## Model and LoRA versions\n\n" + text)
    filters = facts["filters"]
    filter_text = ", ".join(f"`{k} = {v}`" for k, v in filters.items()) if filters else "none"
    dropped = ", ".join(f"{k}: {v}" for k, v in facts["filtered_out"].items()) or "none"
    parts.append("## Filters\n\n"
                 f"- applied: {filter_text}\n"
                 f"- images in the run (rows with status ok): {facts['images_in_run']}; kept: {facts['samples']}\n"
                 f"- filtered out, by reason: {dropped}\n"
                 f"- rows with errors (no images): {facts['rows_error']} of {facts['rows_in_run']}")
    if facts["run"]:
        parts.append("## Source run\n\n" + "\n".join(f"- {k}: {json.dumps(v)}" for k, v in facts["run"].items()))
    parts.append("## Fields\n\n" + "\n".join(f"- `{k}`: {v}" for k, v in FIELDS.items()))
    return "\n\n".join(parts) + "\n"
