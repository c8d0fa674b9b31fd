"""The toy world's oracle on finished jobs: `dreamrelation batch judge` (a run of toy-world rows) and
`dreamrelation data judge` (a data engine output of toy relation specs).

A run of a toy manifest (``dreamrelation data toy-world --kind manifest``) with the toy preset makes images whose
truth is known: the oracle (``dreamrelation.toy.oracle``) reads each final image and says whether the row's
subjects are there with the right shape, colour and pattern, and whether the row's relation holds among them.
Under the quality gate it judges every attempt too: each slot's first attempt is the image the run would have kept
without the gate (final vs first attempts: the gate's effect, measured), and the attempts the gate passed vs those
it failed say whether its scores tell good images from bad ones. Writes ``{output}/oracle.parquet``, one row per
judged image (a final image is also one of its slot's attempts: it has a row of each kind).

An engine output of toy specs (``data toy-world --kind spec``, ``data generate --preset toy``) keeps every target it
generated, made into a triplet or dropped by a gate: the oracle reads each against its sample's subjects and
relation, so the targets the gates kept and those they dropped (by reason) are compared: whether the gates keep the
good ones. Writes ``{output}/oracle.parquet`` there too (one row per target).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from dreamrelation.toy import oracle
from manifests import storage
from manifests.engine_outcome import DROPPED_FILE, SUMMARY_FILE, read_outcomes
from manifests.io import read_manifest, write_table
from manifests.ledger import ledger_records
from manifests.run_record import read_run_json

from .toy_oracle import open_image, question_of, toy_question

ORACLE_FILE = "oracle.parquet"
SCHEMA = pa.schema([("row_id", pa.string()), ("k", pa.int32()), ("attempt", pa.int32()), ("final", pa.bool_()),
                    ("relation", pa.string()), ("identity_ok", pa.bool_()), ("shape_colour_ok", pa.bool_()),
                    ("relation_ok", pa.bool_()),
                    ("ok", pa.bool_()), ("gate_passed", pa.bool_()), ("reasons", pa.string()),
                    ("image", pa.string())])


def judge_run(output: str, manifest: str | None = None) -> dict[str, Any]:
    """Judge every final image of the run at ``output`` (and, under the gate, every attempt) against its manifest
    row (``manifest``, default: the one its run.json names); returns ``{"final": rates, "first_attempt": rates,
    "gate_passed": rates, "gate_failed": rates, "skipped": {...}, "file": URI}`` (rates as ``oracle.rates``; the
    three attempt entries are None without the gate, or when no attempt is of that kind) and writes
    ``{output}/oracle.parquet``. ``ValueError`` when the run has no manifest on record or none of its rows is a
    toy-world row."""
    output = storage.absolute(output).rstrip("/")
    manifest = manifest or (read_run_json(output).get("settings") or {}).get("manifest")
    if not manifest:
        raise ValueError(f"{output}: no run.json naming its manifest (is it a `batch submit` output?); pass "
                         f"--manifest")
    rows = {r.row_id: r for r in read_manifest(manifest)[0]}
    judged: list[dict[str, Any]] = []
    skipped = {"error_rows": 0, "not_toy_rows": 0}
    verdicts: dict[str, list[oracle.Verdict]] = {"final": [], "first_attempt": [], "gate_passed": [],
                                                 "gate_failed": []}
    for rec in ledger_records(output):
        if rec["status"] != "ok":
            skipped["error_rows"] += 1
            continue
        question = toy_question(rows.get(rec["row_id"]), source=None)
        if question is None:
            skipped["not_toy_rows"] += 1
            continue
        identities, relation = question
        attempts = sorted(rec.get("attempts") or [], key=lambda a: (a["k"], a["attempt"]))
        shots = [(uri, k, None, None) for k, uri in enumerate(rec["images"])]
        shots += [(a["image"], a["k"], a["attempt"], a["passed"]) for a in attempts]
        seen: dict[str, oracle.Verdict] = {}  # a final image is also an attempt: judged once
        for image, k, attempt, passed in shots:
            v = seen.get(image) or oracle.judge(open_image(image), identities, relation)
            seen[image] = v
            if attempt is None:
                verdicts["final"].append(v)
            else:
                verdicts["gate_passed" if passed else "gate_failed"].append(v)
                if attempt == 0:
                    verdicts["first_attempt"].append(v)
            judged.append(dict(row_id=rec["row_id"], k=k, attempt=attempt, final=attempt is None,
                               relation=relation, identity_ok=all(v.identity), shape_colour_ok=all(v.shape_colour),
                               relation_ok=v.relation, ok=v.ok, gate_passed=passed,
                               reasons="; ".join(v.reasons), image=image))
    if not verdicts["final"]:
        raise ValueError(f"{output}: no toy-world row with images to judge (error rows: {skipped['error_rows']}, "
                         f"other rows: {skipped['not_toy_rows']}); the manifest must come from `data toy-world`")
    write_table(pa.Table.from_pylist(judged, schema=SCHEMA), storage.join(output, ORACLE_FILE))
    return {**{name: oracle.rates(v) if v else None for name, v in verdicts.items()},
            "skipped": skipped, "file": storage.join(output, ORACLE_FILE)}


ENGINE_SCHEMA = pa.schema([("sample_id", pa.string()), ("relation", pa.string()), ("status", pa.string()),
                           ("reason", pa.string()), ("identity_ok", pa.bool_()), ("shape_colour_ok", pa.bool_()),
                           ("relation_ok", pa.bool_()), ("ok", pa.bool_()), ("reasons", pa.string()),
                           ("image", pa.string())])


def judge_engine(output: str) -> dict[str, Any]:
    """Judge every target the data engine at ``output`` generated: the made triplets' and the dropped samples'
    (those with a target: generation errors have none). Returns ``{"made": rates, "dropped": rates,
    "dropped_by_reason": {reason: rates}, "skipped": {...}, "file": URI}`` (rates as ``oracle.rates``, None where
    no target is of that kind) and writes ``{output}/oracle.parquet``. ``ValueError`` when ``output`` holds no
    engine.json, or none of its samples is a toy-world question (``data toy-world --kind spec``)."""
    from manifests.relation_spec import expand_specs, read_relation_specs
    from manifests.triplets import TRIPLET_FILE, read_triplets

    from .engine_worker import sample_uri

    output = storage.absolute(output).rstrip("/")
    summary_uri = storage.join(output, SUMMARY_FILE)
    if not storage.exists(summary_uri):
        raise ValueError(f"{output}: no {SUMMARY_FILE} (is it a `data generate` output?)")
    spec = json.loads(storage.read_bytes(summary_uri)).get("spec")
    samples = {s.sample_id: s for s in expand_specs(read_relation_specs(spec))}
    targets: list[tuple[str, str, str | None]] = []  # (sample id, status, reason)
    triplets_uri = storage.join(output, TRIPLET_FILE)
    if storage.exists(triplets_uri):
        targets += [(t.triplet_id, "made", None) for t in read_triplets(triplets_uri)[0]]
    dropped_uri = storage.join(output, DROPPED_FILE)
    if storage.exists(dropped_uri):
        targets += [(o.sample_id, "dropped", o.reason) for o in read_outcomes(dropped_uri)
                    if o.stage != "generate"]
    judged: list[dict[str, Any]] = []
    skipped = {"not_toy_samples": 0, "missing_targets": 0}
    verdicts: dict[str, list[oracle.Verdict]] = {"made": [], "dropped": []}
    by_reason: dict[str, list[oracle.Verdict]] = {}
    for sample_id, status, reason in targets:
        sample = samples.get(sample_id)
        question = question_of(list(sample.classes), sample.relation) if sample is not None else None
        image = sample_uri(output, sample_id, "target.png")
        if question is None:
            skipped["not_toy_samples"] += 1
            continue
        if not storage.exists(image):
            skipped["missing_targets"] += 1
            continue
        v = oracle.judge(open_image(image), *question)
        verdicts[status].append(v)
        if reason is not None:
            by_reason.setdefault(reason, []).append(v)
        judged.append(dict(sample_id=sample_id, relation=question[1], status=status, reason=reason,
                           identity_ok=all(v.identity), shape_colour_ok=all(v.shape_colour), relation_ok=v.relation,
                           ok=v.ok, reasons="; ".join(v.reasons), image=image))
    if not judged:
        raise ValueError(f"{output}: no target of a toy-world sample to judge (samples not from the toy world: "
                         f"{skipped['not_toy_samples']}, targets missing: {skipped['missing_targets']}); the specs "
                         f"must come from `data toy-world --kind spec`")
    write_table(pa.Table.from_pylist(judged, schema=ENGINE_SCHEMA), storage.join(output, ORACLE_FILE))
    return {**{name: oracle.rates(v) if v else None for name, v in verdicts.items()},
            "dropped_by_reason": {r: oracle.rates(v) for r, v in sorted(by_reason.items())},
            "skipped": skipped, "file": storage.join(output, ORACLE_FILE)}
