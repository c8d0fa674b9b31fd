"""`dreamrelation batch judge`: the toy world's oracle on a finished run of toy-world rows.

A run of a toy manifest (``dreamrelation data toy-world --kind manifest``) with the toy preset makes images whose
truth is known: the oracle (``dreamrelation.toy.oracle``) reads each final image and says whether the row's
subjects are there with the right shape, colour and pattern, and whether the row's relation holds among them.
Under the quality gate it also judges each slot's first attempt, which is the image the run would have kept without
the gate: the two rates side by side are the gate's effect, measured. Writes ``{output}/oracle.parquet``, one row
per judged image.
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
from PIL import Image

from dreamrelation.toy import oracle, world
from manifests import storage
from manifests.io import read_manifest, write_table
from manifests.ledger import ledger_records
from manifests.run_record import read_run_json

ORACLE_FILE = "oracle.parquet"
SCHEMA = pa.schema([("row_id", pa.string()), ("k", pa.int32()), ("attempt", pa.int32()), ("final", pa.bool_()),
                    ("relation", pa.string()), ("identity_ok", pa.bool_()), ("shape_colour_ok", pa.bool_()),
                    ("relation_ok", pa.bool_()),
                    ("ok", pa.bool_()), ("reasons", pa.string()), ("image", pa.string())])
RELATION_IDS = {r.id for r in world.RELATIONS}


def _open(uri: str) -> Image.Image:
    with Image.open(io.BytesIO(storage.read_bytes(uri))) as im:
        return im.convert("RGB")


def judge_run(output: str, manifest: str | None = None) -> dict[str, Any]:
    """Judge every final image of the run at ``output`` (and, under the gate, every slot's first attempt) against
    its manifest row (``manifest``, default: the one its run.json names); returns ``{"final": rates,
    "first_attempt": rates | None, "skipped": {...}}`` (rates as ``oracle.rates``) and writes
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
    final, first = [], []
    for rec in ledger_records(output):
        if rec["status"] != "ok":
            skipped["error_rows"] += 1
            continue
        row = rows.get(rec["row_id"])
        relation = row and (row.relation if row.relation in RELATION_IDS else row.metadata.get("toy_relation"))
        phrases = [s.phrase for s in row.subjects] if row else []
        try:
            identities = [world.Identity.parse(p) for p in phrases]
        except ValueError:
            identities = []
        if relation not in RELATION_IDS or not identities:
            skipped["not_toy_rows"] += 1
            continue
        firsts = {}
        for a in rec.get("attempts") or []:
            if a["k"] not in firsts or a["attempt"] < firsts[a["k"]]["attempt"]:
                firsts[a["k"]] = a
        for k, uri in enumerate(rec["images"]):
            shots = [(uri, True, None)]
            if k in firsts:
                shots.append((firsts[k]["image"], False, firsts[k]["attempt"]))
            for image, is_final, attempt in shots:
                v = oracle.judge(_open(image), identities, relation)
                (final if is_final else first).append(v)
                judged.append(dict(row_id=rec["row_id"], k=k, attempt=attempt, final=is_final, relation=relation,
                                   identity_ok=all(v.identity), shape_colour_ok=all(v.shape_colour),
                                   relation_ok=v.relation, ok=v.ok,
                                   reasons="; ".join(v.reasons), image=image))
    if not final:
        raise ValueError(f"{output}: no toy-world row with images to judge (error rows: {skipped['error_rows']}, "
                         f"other rows: {skipped['not_toy_rows']}); the manifest must come from `data toy-world`")
    write_table(pa.Table.from_pylist(judged, schema=SCHEMA), storage.join(output, ORACLE_FILE))
    return {"final": oracle.rates(final), "first_attempt": oracle.rates(first) if first else None,
            "skipped": skipped, "file": storage.join(output, ORACLE_FILE)}
