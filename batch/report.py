"""What happened in a run, for people: ``batch status`` (counts) and ``batch report`` (a static HTML gallery)."""

from __future__ import annotations

import html
from typing import Any

import pyarrow.compute as pc

from manifests import storage
from manifests.io import parquet_rows, read_manifest_table, validate_table
from manifests.ledger import ledger_records, read_ledger
from manifests.run_record import read_run_json
from manifests.schema import GenerationRow

METRICS = ("clip_t", "clip_r", "clip_i", "clip_i_crop", "dino")
REPORT_ROWS = 2000  # rows shown in report.html: a gallery, not a dump of a million-row run


def preset_note(preset: str | None, what: str) -> str:
    """What a miniature preset's scores of a ``what`` ("job", "evaluation") mean, in words ("" for others)."""
    if preset == "tiny":
        return ("Preset 'tiny': random miniature weights. These images are noise and their metrics say nothing about "
                f"quality; they show that every step of the {what} ran.")
    if preset == "toy":
        return ("Preset 'toy': a miniature model trained on the toy world (coloured shapes at 64 px, "
                "dreamrelation.toy). Its CLIP scores come from a CLIP trained on that world and its DINO scores from a "
                "random DINO (they mean nothing); what its oracle measured is in the preset's card.json.")
    return ""


def preset_banner(preset: str | None, what: str) -> str:
    """The warning a report of a miniature preset's ``what`` opens with (:func:`preset_note` as HTML; "" for others)."""
    note = preset_note(preset, what)
    if not note:
        return ""
    name, rest = note.split(": ", 1)
    return f'<p class="warn"><b>{html.escape(name)}</b>: {html.escape(rest)}</p>'


def load_run(output: str, limit: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(run.json or {}, the ledger: the final result of each row (the first ``limit`` by row id), image URIs
    resolved under ``output``)."""
    return read_run_json(output), ledger_records(output, limit=limit)


def run_rows(output: str, run: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, GenerationRow]:
    """The manifest row of each result: from its ``request`` (what the actor generated), else (results of older
    versions) from the run's ``manifest.parquet`` or the manifest run.json names; {} when that has moved."""
    rows = {r["row_id"]: GenerationRow.model_validate_json(r["request"]) for r in results if r.get("request")}
    if len(rows) == len(results):
        return rows
    own = storage.join(output, "manifest.parquet")
    source = own if storage.exists(own) else (run.get("settings") or run).get("manifest")
    if source:
        try:  # the accepted rows only: a manifest with rejected rows still names the prompts of the others
            accepted, _ = validate_table(read_manifest_table(source), base_uri=source)
            rows = {**{r.row_id: r for r in accepted}, **rows}
        except Exception:  # noqa: BLE001 - the manifest may have moved: the report still shows results and metrics
            pass
    return rows


def status(output: str) -> dict[str, Any]:
    """A run folder in numbers: the ledger's counts and mean metrics (computed in Arrow, whatever the run's size),
    the run's rows by state (run.json, whole run), and the latest attempt."""
    run = read_run_json(output)
    table = read_ledger(output, ("images", "gate", "attempts", *METRICS))
    if not run and not table.num_rows:
        raise FileNotFoundError(f"no run found at {output!r} (no run.json, no results/)")
    ok = pc.equal(table["status"], "ok")
    n_ok = int(pc.sum(ok).as_py() or 0)
    rejected = parquet_rows(storage.join(output, "rejected.parquet"))
    out = dict(output=output, rows_with_results=table.num_rows, ok=n_ok, error=table.num_rows - n_ok,
               images=int(pc.sum(pc.list_value_length(table["images"])).as_py() or 0), rejected=rejected)
    rows = run.get("rows") or {}
    if rows.get("read") is not None:
        out["read"] = rows["read"]
        out["pending"] = max(0, rows["read"] - out["ok"] - out["error"] - rejected)
    gated = pc.is_valid(table["gate"])
    if pc.any(gated).as_py():  # rows judged by a quality gate; attempts: every image made under it
        out.update(gate_passed=int(pc.sum(pc.equal(table["gate"], "passed")).as_py() or 0),
                   gate_failed=int(pc.sum(pc.equal(table["gate"], "failed")).as_py() or 0),
                   gate_attempts=int(pc.sum(pc.list_value_length(table.filter(gated)["attempts"])).as_py() or 0))
    for m in METRICS:
        values = pc.list_flatten(table[m])
        mean = pc.mean(values).as_py() if len(values) else None
        out[f"mean_{m}"] = round(mean, 2) if mean is not None else None
    if run.get("attempts"):
        out["attempts"] = len(run["attempts"])
        out["status"] = run.get("status")
        out["last_attempt"] = run.get("last_attempt")
    return out


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def render_report(output: str) -> str:
    """Write ``{output}/report.html`` (one card per image: prompt, relation, the subjects' reference images, boxes,
    metrics; sortable) and return its URI."""
    run, results = load_run(output, limit=REPORT_ROWS)
    manifest_rows = run_rows(output, run, results)
    st = status(output)
    shown = (f"<p>Showing the first {len(results):,} rows by row id of {st['rows_with_results']:,} "
             f"(<code>batch export</code> writes them all).</p>" if st["rows_with_results"] > len(results) else "")
    cards = []
    for r in sorted(results, key=lambda r: r["row_id"]):
        row = manifest_rows.get(r["row_id"])
        prompt = row.prompt if row else ""
        subjects = ", ".join(f"{s.phrase} {list(s.box)}" for s in row.subjects) if row else ""
        overlay = "".join(  # the layout boxes drawn over the image (toggle with the checkbox)
            f'<span class="box" style="left:{100 * s.box[0]:.1f}%;top:{100 * s.box[1]:.1f}%;'
            f'width:{100 * (s.box[2] - s.box[0]):.1f}%;height:{100 * (s.box[3] - s.box[1]):.1f}%">'
            f'{html.escape(s.phrase)}</span>' for s in (row.subjects if row else []))
        references = "".join(  # the subject images the row asked for, as the reader's reference
            f'<a href="{html.escape(storage.href(s.image, output))}"><img class="ref" '
            f'src="{html.escape(storage.href(s.image, output))}" title="{html.escape(s.phrase)}" '
            f'alt="{html.escape(s.phrase)}" loading="lazy"></a>' for s in (row.subjects if row else []))
        for k, uri in enumerate(r["images"]):
            rel = uri[len(output.rstrip("/")) + 1:] if uri.startswith(output.rstrip("/")) else uri
            vals = {m: (r.get(m) or [None] * (k + 1))[k] if k < len(r.get(m) or []) else None for m in METRICS}
            data = " ".join(f'data-{m.replace("_", "")}="{"" if v is None else f"{v:.4f}"}"' for m, v in vals.items())
            metrics = " · ".join(f"{m.upper().replace('_', '-')} {_fmt(v)}" for m, v in vals.items() if v is not None)
            tries = [a for a in r.get("attempts") or [] if a["k"] == k]  # this image's gate attempts
            if tries:
                verdict = "passed" if any(a["passed"] and a["image"] == uri for a in tries) else "failed"
                metrics += f" · gate {verdict} ({len(tries)} attempt{'s' if len(tries) != 1 else ''})"
            cards.append(
                f'<figure class="card" data-row="{html.escape(r["row_id"])}" {data}>'
                f'<a class="frame" href="{html.escape(rel)}"><img src="{html.escape(rel)}" loading="lazy">{overlay}</a>'
                f'<figcaption><b>{html.escape(r["row_id"])}</b> #{k} · <i>{html.escape(r.get("relation") or "no LoRA")}'
                f'</i><br>{html.escape(prompt)}<br><span class="refs">{references}</span>'
                f'<small>{html.escape(subjects)}</small><br>'
                f'<small>{html.escape(metrics)}</small></figcaption></figure>'
            )
    errors = [r for r in results if r["status"] != "ok"]
    summary_rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                           for k, v in st.items() if k != "last_attempt")
    error_rows = "".join(f"<tr><td>{html.escape(r['row_id'])}</td><td>{html.escape(r.get('error') or '')}</td></tr>"
                         for r in errors)
    options = "".join(f'<option value="{m.replace("_", "")}">{m.upper().replace("_", "-")}</option>' for m in METRICS)
    preset = (run.get("settings") or run.get("configuration") or {}).get("preset")
    banner = preset_banner(preset, "job")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>dreamrelation run: {html.escape(output)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} .grid{{display:flex;flex-wrap:wrap;gap:12px}}
.card{{width:260px;margin:0;border:1px solid #ccc;padding:6px;font-size:13px}}
.frame{{position:relative;display:block;line-height:0}} .box{{position:absolute;border:2px solid #e6194b;
color:#fff;background:rgba(230,25,75,.15);font-size:11px;line-height:13px;box-sizing:border-box}}
body.nobox .box{{display:none}} .card img{{width:256px;height:auto;
image-rendering:pixelated}} .card img.ref{{width:48px;height:48px;object-fit:cover;margin:2px 2px 0 0;
border:1px solid #999}} table{{border-collapse:collapse}} td,th{{border:1px solid #ddd;padding:3px 8px;
text-align:left}}</style></head><body>
<h1>Run {html.escape(output)}</h1>{banner}<table>{summary_rows}</table>
<h2>Errors ({len(errors)})</h2><table><tr><th>row_id</th><th>reason</th></tr>{error_rows}</table>
<h2>Images ({len(cards)})</h2>{shown}
<label>sort by <select id="key"><option value="row">row id</option>{options}</select></label>
<label><input type="checkbox" checked onchange="document.body.classList.toggle('nobox', !this.checked)">
layout boxes</label>
<div class="grid" id="grid">{''.join(cards)}</div>
<script>
document.getElementById('key').onchange = function() {{
  const key = this.value, grid = document.getElementById('grid');
  const cards = Array.from(grid.children);
  cards.sort((a, b) => key === 'row' ? a.dataset.row.localeCompare(b.dataset.row)
    : (parseFloat(b.dataset[key]) || -1) - (parseFloat(a.dataset[key]) || -1));
  cards.forEach(c => grid.appendChild(c));
}};
</script></body></html>"""
    uri = storage.join(output, "report.html")
    storage.write_bytes_atomic(uri, page.encode())
    return uri
