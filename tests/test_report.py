"""``batch status`` and ``batch report`` over a run folder made by the worker core (no Ray): counts and mean
metrics recomputed from the results table; the HTML gallery names every image, prompt, relation, metric value and
error reason, with a summary table and the sort control."""

from __future__ import annotations

import html
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.report import METRICS, render_report, status
from batch.worker import Worker, WorkerConfig
from manifests import storage
from manifests.io import (
    MANIFEST_SCHEMA,
    read_manifest,
    read_manifest_table,
    read_results,
    validate_table,
    write_manifest,
    write_rejections,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "manifests" / "examples"


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory) -> dict:
    """A small run folder laid out like the job's: a manifest of 6 rows (4 that generate, one whose subject image
    is missing, one rejected for its box), rejected.parquet, results/ written by the worker, and run.json."""
    root = tmp_path_factory.mktemp("report-run")
    rows, _ = read_manifest(str(EXAMPLES / "example.parquet"))
    picked = {r.row_id: r.model_dump() for r in rows}
    chosen = [picked[k] for k in ("ex-00-hugging", "ex-05-shaking_hands", "ex-10-riding", "ex-15-none")]
    broken = {**picked["ex-01-hugging"], "row_id": "rep-missing-subject"}
    broken["subjects"] = [{**broken["subjects"][0], "image": str(root / "absent.png")}, broken["subjects"][1]]
    rejected_row = {**picked["ex-02-hugging"], "row_id": "rep-bad-box"}
    records = chosen + [broken]
    manifest = str(root / "manifest.parquet")
    write_manifest(records, manifest)
    # the bad row goes into the file as the job would find it (write_manifest refuses invalid rows)
    bad = {**rejected_row, "subjects": [{**s, "box": [0.5, 0.1, 0.2, 0.9]} for s in rejected_row["subjects"]]}
    table = pa.concat_tables([pq.read_table(manifest), pa.Table.from_pylist([bad], schema=MANIFEST_SCHEMA)])
    pq.write_table(table, manifest)

    out = root / "out"
    accepted, rejected = validate_table(read_manifest_table(manifest), check_image=None, base_uri=manifest)
    assert [r.row_id for r in rejected] == ["rep-bad-box"]
    write_rejections(rejected, storage.join(str(out), "rejected.parquet"))
    worker = Worker(WorkerConfig(output=str(out), preset="tiny", loras=str(EXAMPLES / "loras"), device="cpu"))
    results = []
    for start in range(0, len(accepted), 3):  # several results files, as the actors write them
        results += worker.process_and_write([r.model_dump() for r in accepted[start:start + 3]])
    from manifests.run_record import RunRecord, write_run

    write_run(str(out), RunRecord(output=str(out), settings={"manifest": manifest, "preset": "tiny"}, attempts=["0001"],
                                  status="completed",
                                  rows={"read": 6, "ok": 4, "error": 1, "rejected": 1, "pending": 0}))
    return {"out": out, "manifest": manifest, "results": results, "rows": {r.row_id: r for r in accepted}}


def test_status_counts_and_means_match_the_results(run):
    st = status(str(run["out"]))
    table = read_results(str(run["out"] / "results")).to_pylist()
    assert len(table) == 5
    ok = [r for r in table if r["status"] == "ok"]
    assert st["rows_with_results"] == 5
    assert (st["ok"], st["error"], st["rejected"]) == (4, 1, 1)
    assert st["images"] == sum(len(r["images"]) for r in table) == 2 + 1 + 1 + 2
    for m in METRICS:
        values = [v for r in ok for v in r[m]]
        assert len(values) == 6
        assert st[f"mean_{m}"] == pytest.approx(sum(values) / len(values), abs=0.006), m
    assert (st["read"], st["pending"], st["attempts"], st["status"]) == (6, 0, 1, "completed")


def test_status_counts_a_row_rewritten_by_a_retry_once(run, tmp_path):
    """A retried batch overwrites its results file; a row written in two files (an actor killed after its write)
    is still one row."""
    copy = tmp_path / "out"
    shutil.copytree(run["out"], copy)
    files = sorted((copy / "results").glob("*.parquet"))
    shutil.copy(files[0], copy / "results" / "part-duplicate.parquet")
    st = status(str(copy))
    assert (st["rows_with_results"], st["ok"], st["error"]) == (5, 4, 1)


def test_report_names_every_image_prompt_metric_and_error(run):
    uri = render_report(str(run["out"]))
    assert uri == str(run["out"] / "report.html")
    page = Path(uri).read_text()
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    for result in run["results"]:
        row = run["rows"][result.row_id]
        if result.status != "ok":
            assert html.escape(result.error) in page
            assert "subjects[0].image" in result.error
            continue
        assert html.escape(row.prompt) in page
        assert f"<i>{html.escape(row.relation or 'no LoRA')}</i>" in page
        for k, image in enumerate(result.images):
            rel = f"images/{result.row_id}/{k}.png"
            assert image == rel  # result rows store keys relative to the run folder
            assert f'src="{rel}"' in page and (run["out"] / rel).is_file()
            for m in METRICS:
                assert f'data-{m.replace("_", "")}="{getattr(result, m)[k]:.4f}"' in page
            assert f"CLIP-T {result.clip_t[k]:.1f}" in page
        for subject in row.subjects:  # each row's reference images, linked relative to the page
            ref = os.path.relpath(subject.image, run["out"])
            assert f'<img class="ref" src="{html.escape(ref)}" title="{html.escape(subject.phrase)}"' in page
            assert (run["out"] / ref).resolve() == Path(subject.image).resolve()
    assert page.count('<figure class="card"') == sum(len(r.images) for r in run["results"])
    # summary table, error section, sort control
    for key in ("rows_with_results", "ok", "error", "images", "rejected", "mean_clip_t"):
        assert f"<tr><th>{key}</th>" in page
    assert "<h2>Errors (1)</h2>" in page and "rep-missing-subject" in page
    assert '<select id="key">' in page
    for m in METRICS:
        assert f'<option value="{m.replace("_", "")}">' in page


def test_report_of_a_moved_run_without_its_manifest(run, tmp_path):
    """The run folder copied elsewhere and the manifest gone: the gallery still shows every image (its keys are
    relative to the run folder) with its prompt (each result carries the row it was made from)."""
    copy = tmp_path / "out"
    shutil.copytree(run["out"], copy)
    Path(run["manifest"]).rename(tmp_path / "moved.parquet")
    try:
        page = Path(render_report(str(copy))).read_text()
    finally:
        (tmp_path / "moved.parquet").rename(run["manifest"])
    assert page.count('<figure class="card"') == 6
    for result in run["results"]:
        if result.status == "ok":
            assert html.escape(run["rows"][result.row_id].prompt) in page
            assert all((copy / key).is_file() and f'src="{key}"' in page for key in result.images)


def test_report_in_a_headless_browser(run, tmp_path):
    """Optional: render the page in headless Chromium and keep a screenshot (skipped without a browser)."""
    import subprocess

    chromium = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)
    if chromium is None:
        pytest.skip("no /usr/bin/chromium")
    shot = tmp_path / "report.png"
    uri = render_report(str(run["out"]))
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1280,1600", f"file://{uri}"], check=True, timeout=120, capture_output=True)
    assert shot.is_file() and shot.stat().st_size > 0


def test_status_and_report_of_a_folder_without_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        status(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        render_report(str(tmp_path))
