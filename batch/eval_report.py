"""RelationBench reports, for people: the tables of the paper's Tables 2 / 3 (Markdown + CSV), the per-relation
breakdown, bar plots of each metric by relation (matplotlib, PNG) and a side-by-side HTML gallery.

Pure rendering of the cells :func:`batch.evaluate.summarize` computed; every file goes through ``manifests.storage``
so an ``s3://`` output works like a folder. Plots use matplotlib's object API with the Agg canvas (no pyplot, no
global backend switch, no display needed).
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence
from typing import Any

from manifests import storage
from manifests.relationbench import KINDS, case_kind, template
from manifests.schema import GenerationRow

from .evaluate import METRICS
from .report import preset_banner, render_report

LABELS = {"clip_t": "CLIP-T", "clip_r": "CLIP-R", "clip_i": "CLIP-I", "dino": "DINO"}
KIND_TITLES = {"single": "Single-object", "multi": "Multi-object"}
CSV_COLUMNS = ("config", "kind", "metric", "mean", "ci_low", "ci_high", "n")
RELATION_COLUMNS = ("config", "kind", "relation", "metric", "mean", "ci_low", "ci_high", "n")


def _cell_text(cell: dict[str, Any] | None) -> str:
    return "" if cell is None else f"{cell['mean']:.2f} [{cell['ci_low']:.2f}, {cell['ci_high']:.2f}]"


def _number(relation: str) -> int:
    """A relation's row in Table 10 (the order of every per-relation table and plot)."""
    return template(relation).number


def _index(cells: Sequence[dict[str, Any]], *fields: str) -> dict[tuple, dict[str, Any]]:
    return {tuple(c[f] for f in fields): c for c in cells}


def tables_markdown(cells: Sequence[dict[str, Any]], configs: Sequence[str], counts: dict[str, dict[str, dict]],
                    without_lora: dict[str, list[str]] | None = None) -> str:
    """The Table 2 layout: one row per configuration; per kind (single | multi) CLIP-T, CLIP-R, CLIP-I, DINO as
    ``mean [95% CI]`` and the number of images; the best mean of each column in bold when one configuration is
    ahead (a tie bolds nothing)."""
    index = _index(cells, "config", "kind", "metric")
    kinds = [k for k in KINDS if any(c["kind"] == k for c in cells)]
    header = ["Configuration"]
    for kind in kinds:
        header += [f"{KIND_TITLES[kind]} {LABELS[m]}" if i == 0 else LABELS[m] for i, m in enumerate(METRICS)]
        header.append("n")
    best = {}
    for kind in kinds:
        for m in METRICS:
            means = sorted((index[(c, kind, m)]["mean"] for c in configs if (c, kind, m) in index
                            and index[(c, kind, m)]["mean"] is not None), reverse=True)
            if len(means) > 1 and means[0] > means[1]:  # a real maximum: one configuration ahead, not a tie
                best[(kind, m)] = means[0]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for conf in configs:
        row = [conf]
        for kind in kinds:
            for m in METRICS:
                cell = index.get((conf, kind, m))
                text = _cell_text(cell)
                row.append(f"**{text}**" if cell is not None and best.get((kind, m)) == cell["mean"] else text)
            n = [index[(conf, kind, m)]["n"] for m in METRICS if (conf, kind, m) in index]
            row.append(str(max(n)) if n else "0")
        lines.append("| " + " | ".join(row) + " |")
    notes = ["", "Mean over images (metrics x100), 95% percentile bootstrap interval in brackets, n images; the best "
             "mean of a column in bold (none on a tie). Error rows are left out of the means:"]
    for conf in configs:
        per = counts.get(conf, {})
        parts = [f"{kind} {per[kind]['ok']}/{per[kind]['cases']} ok, {per[kind]['error']} error, "
                 f"{per[kind]['missing']} without result" for kind in kinds if kind in per]
        notes.append(f"- {conf}: " + "; ".join(parts))
    for conf, relations in (without_lora or {}).items():
        notes.append(f"- {conf}: ran without a LoRA for {', '.join(relations)} (--allow-missing)")
    return "# RelationBench\n\n" + "\n".join(lines + notes) + "\n"


def _csv(cells: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(cells)
    return buf.getvalue()


def per_relation_markdown(cells: Sequence[dict[str, Any]], configs: Sequence[str]) -> str:
    """One table per metric: a row per relation (Table 10 order), a column per configuration, ``mean [CI] (n)``."""
    index = _index(cells, "config", "relation", "metric")
    relations = sorted(dict.fromkeys((c["relation"], c["kind"]) for c in cells), key=lambda rk: _number(rk[0]))
    out = ["# RelationBench by relation"]
    for m in METRICS:
        out += ["", f"## {LABELS[m]}", "", "| Relation | Kind | " + " | ".join(configs) + " |",
                "|" + "---|" * (len(configs) + 2)]
        for relation, kind in relations:
            values = [index.get((c, relation, m)) for c in configs]
            out.append(f"| {relation} | {kind} | "
                       + " | ".join(f"{_cell_text(v)} ({v['n']})" if v else "" for v in values) + " |")
    return "\n".join(out) + "\n"


def plot_metric(cells: Sequence[dict[str, Any]], metric: str, configs: Sequence[str]) -> bytes:
    """A PNG: ``metric`` by relation, one bar per configuration in each relation's group, CI as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    index = _index(cells, "config", "relation", "metric")
    relations = sorted(dict.fromkeys(c["relation"] for c in cells), key=_number)
    fig = Figure(figsize=(max(6.0, 0.55 * len(relations) * max(1, len(configs)) ** 0.5 + 2), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(configs))
    for j, conf in enumerate(configs):
        xs, ys, err = [], [], [[], []]
        for i, relation in enumerate(relations):
            cell = index.get((conf, relation, metric))
            if cell is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(cell["mean"])
            err[0].append(max(0.0, cell["mean"] - cell["ci_low"]))
            err[1].append(max(0.0, cell["ci_high"] - cell["mean"]))
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=conf)
    ax.set_xticks(range(len(relations)), relations, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"{LABELS[metric]} (x100)")
    ax.set_title(f"{LABELS[metric]} by relation (mean, 95% bootstrap CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _metrics_line(result: dict[str, Any], k: int) -> str:
    parts = []
    for m in METRICS:
        values = result.get(m) or []
        if k < len(values) and values[k] is not None:
            parts.append(f"{LABELS[m]} {values[k]:.1f}")
    return " · ".join(parts)


def gallery_html(output: str, configs: Sequence[str], cases: Sequence[GenerationRow],
                 results: dict[str, Sequence[dict[str, Any]]], preset: str,
                 without_lora: dict[str, list[str]] | None = None) -> str:
    """One row per case (prompt, relation, subject thumbnails), one column per configuration (its images and
    metrics, or the row's error)."""
    e = html.escape
    by_config = {c: {r["row_id"]: r for r in results.get(c, [])} for c in configs}
    head = "".join(
        f'<th>{e(c)}<br><small><a href="{e(storage.href(storage.join(output, "runs", c, "report.html"), output))}">run '
        f'report</a>{"<br>no LoRA for " + e(", ".join(without_lora[c])) if c in (without_lora or {}) else ""}'
        f'</small></th>' for c in configs)
    rows = []
    for case in cases:
        thumbs = "".join(f'<img class="thumb" src="{e(storage.href(s.image, output))}" title="{e(s.phrase)}">'
                         for s in case.subjects)
        cells = [f'<td class="case"><b>{e(case.row_id)}</b> · {e(case_kind(case))} · <i>{e(case.relation or "")}'
                 f'</i><br>{e(case.prompt)}<br>{thumbs}<br><small>'
                 f'{e(", ".join(s.phrase for s in case.subjects))} · seed {case.seed}</small></td>']
        for c in configs:
            res = by_config[c].get(case.row_id)
            if res is None:
                cells.append('<td class="none">no result</td>')
            elif res["status"] != "ok":
                cells.append(f'<td class="error">error: {e(res.get("error") or "")}</td>')
            else:
                cells.append("<td>" + "".join(
                    f'<figure><a href="{e(storage.href(u, output))}"><img src="{e(storage.href(u, output))}" loading="lazy"></a>'
                    f'<figcaption>{e(_metrics_line(res, k))}</figcaption></figure>'
                    for k, u in enumerate(res.get("images") or [])) + "</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    banner = preset_banner(preset, "evaluation")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>RelationBench: {e(output)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:6px;vertical-align:top;font-size:13px}} td.case{{max-width:280px}}
figure{{margin:0 0 6px 0}} td img{{width:192px;height:auto;image-rendering:pixelated}}
img.thumb{{width:56px;height:56px;object-fit:cover;margin:4px 4px 0 0}} td.error{{color:#b00}}
.warn{{background:#fff3cd;padding:8px;border:1px solid #e0c060}}</style></head><body>
<h1>RelationBench: {e(output)}</h1>{banner}
<p><a href="tables.md">tables.md</a> · <a href="tables.csv">tables.csv</a> ·
<a href="per_relation.md">per_relation.md</a> · plots: {" ".join(f'<a href="plots/{m}.png">{LABELS[m]}</a>' for m in METRICS)}</p>
<table><tr><th>case</th>{head}</tr>
{"".join(rows)}
</table></body></html>"""


def write_reports(output: str, *, configs: Sequence[str], cases: Sequence[GenerationRow],
                  results: dict[str, Sequence[dict[str, Any]]], cells: Sequence[dict[str, Any]],
                  per_relation: Sequence[dict[str, Any]], counts: dict[str, dict[str, dict]], preset: str,
                  without_lora: dict[str, list[str]] | None = None) -> dict[str, str]:
    """Write tables.md / .csv, per_relation.md / .csv, plots/{metric}.png, gallery.html and each run's report.html
    under ``output``; returns {name: URI}."""
    files = {
        "tables.md": tables_markdown(cells, configs, counts, without_lora).encode(),
        "tables.csv": _csv(cells, CSV_COLUMNS).encode(),
        "per_relation.md": per_relation_markdown(per_relation, configs).encode(),
        "per_relation.csv": _csv(per_relation, RELATION_COLUMNS).encode(),
    }
    for m in METRICS:
        if any(c["metric"] == m for c in per_relation):
            files[f"plots/{m}.png"] = plot_metric(per_relation, m, configs)
    files["gallery.html"] = gallery_html(output, configs, cases, results, preset, without_lora).encode()
    written = {}
    for name, data in files.items():
        written[name] = storage.join(output, name)
        storage.write_bytes_atomic(written[name], data)
    for c in configs:  # each configuration's own run report (batch report), linked from the gallery
        written[f"runs/{c}/report.html"] = render_report(storage.join(output, "runs", c))
    return written
