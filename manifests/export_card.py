"""The dataset card of an export: the facts (counts, relations, metric distributions, model and LoRA versions,
filters) as a dict, and ``README.md``: a YAML header the Hugging Face Hub and ``datasets`` read, then the facts for
people. COCO exports keep the same facts in ``annotations.json``'s ``info``.

The model and LoRA versions come from the exported samples, i.e. from the provenance each result row recorded when
its images were made (fingerprints of the weights, the relation LoRA file and the sha256 of its bytes), never from
the LoRA registry or the model folders at export time: a LoRA replaced or a registry removed since the run does not
change the card of that run's images.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import Counter, defaultdict
from datetime import datetime, timezone
from typing import Any, Optional

import yaml

from manifests.export_samples import METRICS, ExportFilter, RunSamples, Sample, run_setting

logger = logging.getLogger(__name__)

__all__ = ["TINY_WARNING", "card_facts", "metric_stats", "model_versions", "render_card", "run_counts"]

TITLE = "DreamRelation synthetic relation dataset"
TINY_WARNING = ("Made with the `tiny` preset: random miniature weights. The images are noise and the metrics say "
                "nothing about quality; this export only shows that every step of the pipeline ran.")
RUN_COUNTS = ("read", "accepted", "rejected", "ok", "error", "pending", "images", "gate")  # run.json, any version
WEIGHTS = (("model", "model_fingerprint"), ("adapter", "adapter_fingerprint"),
           ("local_encoder", "local_encoder_fingerprint"))
NOT_RECORDED = "(none recorded)"
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
    "model_fingerprint, adapter_fingerprint": "fingerprints of the SDXL weights and of the DreamRelation adapter "
                                              "that made the image, as recorded when it was made; null: not "
                                              "recorded (a run of an older version)",
    "local_encoder_fingerprint": "fingerprint of the local subject encoder checkpoint; null: none was used (or not "
                                 "recorded)",
    "lora_sha256": "sha256 of the relation LoRA file's bytes exactly as loaded for the image; null: no relation "
                   "LoRA (or not recorded)",
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


def _counted(values: list[Any], name: str) -> list[dict[str, Any]]:
    """``[{name: value, "samples": n}, ...]`` of the distinct values, the most frequent first."""
    counts = Counter(values)
    return [{name: v, "samples": n} for v, n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))]


def model_versions(samples: list[Sample]) -> dict[str, Any]:
    """What made the samples, from their provenance: the presets, the distinct model / adapter / local-encoder
    fingerprints and, per relation, the distinct ``(lora_uri, lora_sha256)`` files, each with its sample count."""
    lora_files: dict[str, list[tuple[Optional[str], Optional[str]]]] = defaultdict(list)
    for s in samples:
        if s.relation is not None:
            lora_files[s.relation].append((s.lora_uri, s.lora_sha256))
    return {
        "presets": _counted([s.model_preset for s in samples], "preset"),
        "fingerprints": {part: _counted([getattr(s, attr) for s in samples], "fingerprint")
                         for part, attr in WEIGHTS},
        "lora_versions": {relation: [{"uri": e["file"][0], "sha256": e["file"][1], "samples": e["samples"]}
                                     for e in _counted(files, "file")]
                          for relation, files in sorted(lora_files.items())},
    }


def run_counts(run: dict[str, Any]) -> dict[str, Any]:
    """The run's counts as its run.json states them: ``rows`` (read, ok, error, rejected, pending), ``images``,
    ``gate`` and the number of ``attempts`` (format 2), or the top-level counts of older runs."""
    counts: dict[str, Any] = {}
    rows = run.get("rows")
    if isinstance(rows, dict):
        counts.update(rows)
    for key in RUN_COUNTS:
        if key not in counts and run.get(key) is not None:
            counts[key] = run[key]
    attempts = run.get("attempts")
    if isinstance(attempts, list):
        counts["attempts"] = len(attempts)
    return counts


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
    versions = model_versions(samples)
    presets = [p["preset"] for p in versions["presets"] if p["preset"] is not None]
    preset = run_setting(found.run, "preset") or (presets[0] if len(presets) == 1 else None)
    filtered = dict(sorted(found.filtered_out.items()))
    return {
        "title": TITLE,
        "date_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_run": found.output, "manifest": found.manifest, "rows_from_manifest": found.rows_from_manifest,
        "format": format, "destination": to,
        "samples": len(samples), "rows": len({s.row_id for s in samples}), "relations": relations,
        "metrics": metric_stats(samples),
        "model": {"preset": preset, "loras": run_setting(found.run, "loras"), **versions},
        "filters": filters.describe(),
        "images_in_run": found.images, "filtered_out": filtered, "missing_images": missing_images,
        "rows_in_run": found.rows_read, "rows_error": found.rows_error,
        "run": run_counts(found.run),
        "tiny_preset": preset == "tiny" or "tiny" in presets,
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


def _code(value: Any) -> str:
    return NOT_RECORDED if value is None else f"`{value}`"


def _rows_source(facts: dict[str, Any]) -> str:
    manifest, old = facts.get("manifest"), facts.get("rows_from_manifest", 0)
    if old and old == facts.get("rows_in_run", 0) - facts.get("rows_error", 0):
        return f"rows from `{manifest}`"
    text = "rows from each result's recorded request"
    if old:
        text += f"; {old} rows of results without one from `{manifest}`"
    elif manifest:
        text += f"; the run's manifest: `{manifest}`"
    return text


def _versions_text(model: dict[str, Any]) -> str:
    """The card's "Model and LoRA versions": what each exported image's result recorded when it was made."""
    presets = ", ".join(f"{_code(p['preset'])} ({p['samples']} samples)" for p in model["presets"])
    lines = [("What made the exported images, as each image's result recorded it when it was generated (not read "
              "from the LoRA registry or the model folders at export time)."), "",
             f"- preset: {_code(model['preset'])}" + (f"; per sample: {presets}" if presets else ""),
             f"- LoRA registry of the run (as recorded; not read at export): {_code(model['loras'])}"]
    text = "\n".join(lines)
    text += "\n\n" + _table(["weights", "fingerprint", "samples"],
                            [[part.replace("_", " "), _code(e["fingerprint"]), e["samples"]]
                             for part, entries in model["fingerprints"].items() for e in entries])
    versions = model["lora_versions"]
    if versions:
        text += "\n\n" + _table(["relation", "LoRA file", "sha256", "samples"],
                                [[f"`{r}`", _code(v["uri"]), _code(v["sha256"]), v["samples"]]
                                 for r, entries in versions.items() for v in entries])
    return text


def render_card(facts: dict[str, Any], header: dict[str, Any]) -> str:
    """``README.md``: YAML header (``header`` holds the layout's ``configs`` / ``dataset_info``), then the body."""
    meta = {"pretty_name": facts["title"], "tags": ["synthetic", "dreamrelation", "relation"],
            "task_categories": ["text-to-image", "object-detection"], **header}
    parts = ["---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---", f"# {facts['title']}"]
    if facts["tiny_preset"]:
        parts.append(f"> **Warning**: {TINY_WARNING}")
    parts.append(f"Exported from the batch run `{facts['source_run']}` ({_rows_source(facts)}) by "
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
    parts.append("## Model and LoRA versions\n\n" + _versions_text(facts["model"]))
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
