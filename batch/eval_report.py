"""RelationBench reports, for people: the tables of the paper's Tables 2 / 3 (Markdown + CSV), the per-relation
breakdown, bar plots of each metric by relation (matplotlib, PNG) and a side-by-side HTML gallery. On toy-world
cases the oracle's accuracies (Identity %, Relation %) follow the paper's four metrics wherever they have values.

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
from manifests.relationbench import KINDS, case_kind, relation_sort_key
from manifests.schema import GenerationRow

from .evaluate import ALL_METRICS, METRICS, ORACLE_METRICS, RELATIONBENCH
from .report import preset_banner, preset_note, render_report

LABELS = {"clip_t": "CLIP-T", "clip_r": "CLIP-R", "clip_i": "CLIP-I", "dino": "DINO",
          "oracle_identity": "Identity %", "oracle_relation": "Relation %"}
KIND_TITLES = {"single": "Single-object", "multi": "Multi-object"}
CSV_COLUMNS = ("config", "kind", "metric", "mean", "ci_low", "ci_high", "n")
RELATION_COLUMNS = ("config", "kind", "relation", "metric", "mean", "ci_low", "ci_high", "n")


def _cell_text(cell: dict[str, Any] | None) -> str:
    return "" if cell is None else f"{cell['mean']:.2f} [{cell['ci_low']:.2f}, {cell['ci_high']:.2f}]"


def _number(relation: str | None) -> tuple[int, int, str]:
    """A relation's place in every per-relation table and plot: RelationBench's by their row in Table 10, then the
    toy world's, then others (``manifests.relationbench.relation_sort_key``)."""
    return relation_sort_key(relation)


def _metrics(cells: Sequence[dict[str, Any]]) -> list[str]:
    """The columns: the paper's four always, the oracle's when some cell has them."""
    return [m for m in ALL_METRICS if m in METRICS or any(c["metric"] == m for c in cells)]


def _title(benchmark: str | None) -> str:
    """The reports' title: "RelationBench", naming the cases when they are not (only) RelationBench's."""
    if not benchmark or benchmark.startswith(RELATIONBENCH):
        return benchmark or RELATIONBENCH
    return f"{RELATIONBENCH}: {benchmark}"


def _index(cells: Sequence[dict[str, Any]], *fields: str) -> dict[tuple, dict[str, Any]]:
    return {tuple(c[f] for f in fields): c for c in cells}


def tables_markdown(cells: Sequence[dict[str, Any]], configs: Sequence[str], counts: dict[str, dict[str, dict]],
                    without_lora: dict[str, list[str]] | None = None, benchmark: str | None = None,
                    preset: str | None = None) -> str:
    """The Table 2 layout: one row per configuration; per kind (single | multi) CLIP-T, CLIP-R, CLIP-I, DINO (then
    the oracle's Identity % and Relation % when the cells have them) as ``mean [95% CI]`` and the number of images;
    the best mean of each column in bold when one configuration is ahead (a tie bolds nothing). ``benchmark``
    (``batch.evaluate.benchmark``) names the cases in the title when they are not RelationBench's; a miniature
    ``preset`` adds what its scores mean (:func:`batch.report.preset_note`)."""
    index = _index(cells, "config", "kind", "metric")
    kinds = [k for k in KINDS if any(c["kind"] == k for c in cells)]
    metrics = _metrics(cells)
    header = ["Configuration"]
    for kind in kinds:
        header += [f"{KIND_TITLES[kind]} {LABELS[m]}" if i == 0 else LABELS[m] for i, m in enumerate(metrics)]
        header.append("n")
    best = {}
    for kind in kinds:
        for m in metrics:
            means = sorted((index[(c, kind, m)]["mean"] for c in configs if (c, kind, m) in index
                            and index[(c, kind, m)]["mean"] is not None), reverse=True)
            if len(means) > 1 and means[0] > means[1]:  # a real maximum: one configuration ahead, not a tie
                best[(kind, m)] = means[0]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for conf in configs:
        row = [conf]
        for kind in kinds:
            for m in metrics:
                cell = index.get((conf, kind, m))
                text = _cell_text(cell)
                row.append(f"**{text}**" if cell is not None and best.get((kind, m)) == cell["mean"] else text)
            n = [index[(conf, kind, m)]["n"] for m in metrics if (conf, kind, m) in index]
            row.append(str(max(n)) if n else "0")
        lines.append("| " + " | ".join(row) + " |")
    notes = ["", ("Mean over images (metrics x100), 95% percentile bootstrap interval in brackets, n images; the best "
                  "mean of a column in bold (none on a tie). Error rows are left out of the means:")]
    if any(m in ORACLE_METRICS for m in metrics):
        notes.insert(1, "Identity % and Relation %: the toy world's oracle (dreamrelation.toy.oracle) on each image, "
                        "the share of images with every subject's shape, colour and pattern right, and with the "
                        "asked relation holding.")
    for conf in configs:
        per = counts.get(conf, {})
        parts = [f"{kind} {per[kind]['ok']}/{per[kind]['cases']} ok, {per[kind]['error']} error, "
                 f"{per[kind]['missing']} without result" for kind in kinds if kind in per]
        notes.append(f"- {conf}: " + "; ".join(parts))
    for conf, relations in (without_lora or {}).items():
        notes.append(f"- {conf}: ran without a LoRA for {', '.join(relations)} (--allow-missing)")
    if preset_note(preset, "evaluation"):
        notes += ["", preset_note(preset, "evaluation")]
    return f"# {_title(benchmark)}\n\n" + "\n".join(lines + notes) + "\n"


def _csv(cells: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(cells)
    return buf.getvalue()


def per_relation_markdown(cells: Sequence[dict[str, Any]], configs: Sequence[str],
                          benchmark: str | None = None) -> str:
    """One table per metric (the oracle's when the cells have them): a row per relation (Table 10 order, then the
    toy world's), a column per configuration, ``mean [CI] (n)``."""
    index = _index(cells, "config", "relation", "metric")
    relations = sorted(dict.fromkeys((c["relation"], c["kind"]) for c in cells), key=lambda rk: _number(rk[0]))
    out = [f"# {_title(benchmark)} by relation"]
    for m in _metrics(cells):
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
    ax.set_ylabel(LABELS[metric] if metric in ORACLE_METRICS else f"{LABELS[metric]} (x100)")
    ax.set_title(f"{LABELS[metric]} by relation (mean, 95% bootstrap CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _metrics_line(result: dict[str, Any], k: int, record: dict[str, Any] | None = None) -> str:
    """An image's caption: its metrics from the result row, then the oracle's verdicts from its record."""
    parts = []
    for m in METRICS:
        values = result.get(m) or []
        if k < len(values) and values[k] is not None:
            parts.append(f"{LABELS[m]} {values[k]:.1f}")
    for m in ORACLE_METRICS:
        if record is not None and record.get(m) is not None:
            parts.append(f"{LABELS[m].removesuffix(' %')} {'yes' if record[m] else 'no'}")
    return " · ".join(parts)


def gallery_html(output: str, configs: Sequence[str], cases: Sequence[GenerationRow],
                 results: dict[str, Sequence[dict[str, Any]]], preset: str,
                 without_lora: dict[str, list[str]] | None = None,
                 records: Sequence[dict[str, Any]] | None = None, benchmark: str | None = None) -> str:
    """One row per case (prompt, relation, subject thumbnails), one column per configuration (its images and
    metrics, the oracle's verdicts from ``records`` on toy-world cases, or the row's error)."""
    e = html.escape
    by_image = {(r["config"], r["row_id"], r["k"]): r for r in records or []}
    metrics = [m for m in ALL_METRICS if m in METRICS or any(r.get(m) is not None for r in by_image.values())]
    title = _title(benchmark)
    by_config = {c: {r["row_id"]: r for r in results.get(c, [])} for c in configs}
    head = "".join(
        f'<th>{e(c)}<br><small><a href="{e(storage.href(storage.join(output, "runs", c, "report.html"), output))}">run '
        f'report</a>{"<br>no LoRA for " + e(", ".join(without_lora[c])) if c in (without_lora or {}) else ""}'
        f'</small></th>' for c in configs)
    rows = []
    for case in cases:
        thumbs = "".join(f'<img class="thumb" src="{e(storage.href(s.image, output))}" title="{e(s.phrase)}">'
                         for s in case.subjects)
        cells = [(f'<td class="case"><b>{e(case.row_id)}</b> · {e(case_kind(case))} · <i>{e(case.relation or "")}'
                  f'</i><br>{e(case.prompt)}<br>{thumbs}<br><small>'
                  f'{e(", ".join(s.phrase for s in case.subjects))} · seed {case.seed}</small></td>')]
        for c in configs:
            res = by_config[c].get(case.row_id)
            if res is None:
                cells.append('<td class="none">no result</td>')
            elif res["status"] != "ok":
                cells.append(f'<td class="error">error: {e(res.get("error") or "")}</td>')
            else:
                cells.append("<td>" + "".join(
                    f'<figure><a href="{e(storage.href(u, output))}"><img src="{e(storage.href(u, output))}" '
                    f'loading="lazy"></a><figcaption>{e(_metrics_line(res, k, by_image.get((c, case.row_id, k))))}'
                    '</figcaption></figure>' for k, u in enumerate(res.get("images") or [])) + "</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    banner = preset_banner(preset, "evaluation")
    plots = " ".join(f'<a href="plots/{m}.png">{LABELS[m]}</a>' for m in metrics)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}: {e(output)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:6px;vertical-align:top;font-size:13px}} td.case{{max-width:280px}}
figure{{margin:0 0 6px 0}} td img{{width:192px;height:auto;image-rendering:pixelated}}
img.thumb{{width:56px;height:56px;object-fit:cover;margin:4px 4px 0 0}} td.error{{color:#b00}}
.warn{{background:#fff3cd;padding:8px;border:1px solid #e0c060}}</style></head><body>
<h1>{e(title)}: {e(output)}</h1>{banner}
<p><a href="tables.md">tables.md</a> · <a href="tables.csv">tables.csv</a> ·
<a href="per_relation.md">per_relation.md</a> · plots: {plots}</p>
<table><tr><th>case</th>{head}</tr>
{"".join(rows)}
</table></body></html>"""


def write_reports(output: str, *, configs: Sequence[str], cases: Sequence[GenerationRow],
                  results: dict[str, Sequence[dict[str, Any]]], cells: Sequence[dict[str, Any]],
                  per_relation: Sequence[dict[str, Any]], counts: dict[str, dict[str, dict]], preset: str,
                  without_lora: dict[str, list[str]] | None = None, records: Sequence[dict[str, Any]] | None = None,
                  benchmark: str | None = None) -> dict[str, str]:
    """Write tables.md / .csv, per_relation.md / .csv, plots/{metric}.png, gallery.html and each run's report.html
    under ``output``; returns {name: URI}. ``records`` (``batch.evaluate.image_records``) put the oracle's verdicts
    in the gallery; ``benchmark`` names the cases in the titles."""
    files = {
        "tables.md": tables_markdown(cells, configs, counts, without_lora, benchmark, preset).encode(),
        "tables.csv": _csv(cells, CSV_COLUMNS).encode(),
        "per_relation.md": per_relation_markdown(per_relation, configs, benchmark).encode(),
        "per_relation.csv": _csv(per_relation, RELATION_COLUMNS).encode(),
    }
    for m in ALL_METRICS:
        if any(c["metric"] == m for c in per_relation):
            files[f"plots/{m}.png"] = plot_metric(per_relation, m, configs)
    files["gallery.html"] = gallery_html(output, configs, cases, results, preset, without_lora, records,
                                         benchmark).encode()
    written = {}
    for name, data in files.items():
        written[name] = storage.join(output, name)
        storage.write_bytes_atomic(written[name], data)
    for c in configs:  # each configuration's own run report (batch report), linked from the gallery
        written[f"runs/{c}/report.html"] = render_report(storage.join(output, "runs", c))
    return written
