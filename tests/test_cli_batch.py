"""The ``manifest`` and ``batch status|report`` commands (typer CliRunner; no model, no Ray): exit codes 0 (all rows
OK), 1 (rows rejected, each named with its field), 2 (bad input, with an ``error:`` line naming it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import invoke  # noqa: F401  (the `runner` fixture comes from conftest)

from manifests.io import MANIFEST_SCHEMA, read_manifest, write_results
from manifests.schema import ResultRow

EXAMPLES = Path(__file__).resolve().parents[1] / "manifests" / "examples"
EXAMPLE = EXAMPLES / "example.parquet"


def example_rows() -> list[dict]:
    rows, rejected = read_manifest(str(EXAMPLE))
    assert not rejected
    return [r.model_dump() for r in rows]


# ---- manifest validate ------------------------------------------------------------------------------------------
def test_validate_the_example_manifest(runner):
    result = invoke(runner, "manifest", "validate", EXAMPLE)
    assert result.exit_code == 0, result.output
    ok_lines = [line for line in result.output.splitlines() if re.match(r"row\s+\d+\s+\S+\s+OK\b", line)]
    assert len(ok_lines) == 18
    assert [line.split()[2] for line in ok_lines] == [r["row_id"] for r in example_rows()]
    assert "18 rows: 18 accepted, 0 rejected" in result.output
    assert "REJECTED" not in result.output


def test_validate_names_the_fields_of_bad_rows(runner, tmp_path):
    rows = example_rows()[:6]
    rows[1] = {**rows[1], "subjects": [{**rows[1]["subjects"][0], "box": [0.6, 0.1, 0.2, 0.9]},
                                       rows[1]["subjects"][1]]}  # x0 >= x1
    rows[2] = {**rows[2], "row_id": rows[0]["row_id"]}  # duplicate row_id
    rows[3] = {**rows[3], "prompt": "  "}  # empty prompt
    rows[4] = {**rows[4], "subjects": [{**rows[4]["subjects"][0], "image": str(tmp_path / "absent.png")},
                                       rows[4]["subjects"][1]]}  # missing image
    manifest = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), manifest)
    result = invoke(runner, "manifest", "validate", manifest)
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert re.search(r"REJECTED subjects\.0\.box: .*x0 < x1", lines[1]), lines[1]
    assert re.search(r"REJECTED row_id: duplicate row_id", lines[2]), lines[2]
    assert re.search(r"REJECTED prompt: .*empty", lines[3]), lines[3]
    assert re.search(r"REJECTED subjects\.0\.image: .*absent\.png", lines[4]), lines[4]
    assert " OK " in lines[0] and " OK " in lines[5]
    assert "6 rows: 2 accepted, 4 rejected" in result.output


def test_validate_with_a_registry_names_an_unknown_relation(runner, tmp_path):
    rows = example_rows()[:2]
    rows[1] = {**rows[1], "relation": "kissing"}
    manifest = tmp_path / "rel.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), manifest)
    result = invoke(runner, "manifest", "validate", manifest, "--loras", EXAMPLES / "loras")
    assert result.exit_code == 1, result.output
    assert re.search(r"REJECTED relation: unknown relation 'kissing'", result.output), result.output
    assert invoke(runner, "manifest", "validate", manifest).exit_code == 0  # without a registry: not checked


@pytest.mark.parametrize("case", ["not-parquet", "missing-columns", "absent"])
def test_validate_a_file_that_is_not_a_manifest(runner, tmp_path, case):
    path = tmp_path / "m.parquet"
    if case == "not-parquet":
        path.write_text("row_id,prompt\nr1,a dog\n")
    elif case == "missing-columns":
        pq.write_table(pa.table({"row_id": ["r1"], "caption": ["a dog"]}), path)
    result = invoke(runner, "manifest", "validate", path)
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and str(path) in result.output
    expected = {"not-parquet": "not a readable Parquet file", "missing-columns": "missing required columns",
                "absent": "not found"}[case]
    assert expected in result.output
    if case == "missing-columns":
        assert "'prompt'" in result.output and "'subjects'" in result.output and "'caption'" in result.output


# ---- manifest build ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["example.csv", "example.jsonl"])
def test_build_from_csv_and_jsonl_equals_the_example(runner, tmp_path, source):
    out = tmp_path / "built.parquet"
    result = invoke(runner, "manifest", "build", EXAMPLES / source, out)
    assert result.exit_code == 0, result.output
    assert "18 rows written" in result.output
    assert invoke(runner, "manifest", "validate", out).exit_code == 0
    built, rejected = read_manifest(str(out))
    assert not rejected
    expected = example_rows()
    got = [r.model_dump() for r in built]
    assert [r["row_id"] for r in got] == [r["row_id"] for r in expected]
    assert [r["prompt"] for r in got] == [r["prompt"] for r in expected]
    assert got == expected  # every field, subject images resolved to the same files


def test_build_refuses_bad_rows_and_other_file_types(runner, tmp_path):
    lines = (EXAMPLES / "example.jsonl").read_text().splitlines()[:3]
    bad = json.loads(lines[1])
    bad["steps"] = "many"
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join([lines[0], json.dumps(bad), lines[2]]) + "\n")
    out = tmp_path / "out.parquet"
    result = invoke(runner, "manifest", "build", source, out)
    assert result.exit_code == 2, result.output
    assert "REJECTED steps" in result.output and "1 of 3 rows are invalid" in result.output
    assert not out.exists()
    text = tmp_path / "rows.txt"
    text.write_text("hello")
    result = invoke(runner, "manifest", "build", text, out)
    assert result.exit_code == 2 and "unsupported file type" in result.output
    result = invoke(runner, "manifest", "build", tmp_path / "absent.csv", out)
    assert result.exit_code == 2 and "source not found" in result.output


# ---- manifest relationbench -------------------------------------------------------------------------------------
def test_relationbench_builds_single_and_two_subject_cases(runner, tmp_path):
    out = tmp_path / "rb.parquet"
    result = invoke(runner, "manifest", "relationbench", EXAMPLES / "subjects", "--single", 6, "--multi", 4,
                    "--output", out, "--width", 128, "--height", 128)
    assert result.exit_code == 0, result.output
    assert "10 cases written" in result.output
    rows, rejected = read_manifest(str(out))
    assert not rejected and len(rows) == 10
    assert sorted(len(r.subjects) for r in rows) == [1] * 6 + [2] * 4
    assert len({r.row_id for r in rows}) == 10 and all(r.relation for r in rows)
    assert invoke(runner, "manifest", "validate", out).exit_code == 0  # the subject images exist and decode
    result = invoke(runner, "manifest", "relationbench", tmp_path / "nowhere", "--output", out)
    assert result.exit_code == 2 and "SUBJECTS_DIR not found" in result.output


# ---- batch status / report --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["status", "report"])
def test_status_and_report_without_a_run(runner, tmp_path, command):
    for folder in (tmp_path, tmp_path / "never-made"):
        result = invoke(runner, "batch", command, folder)
        assert result.exit_code == 2, result.output
        assert "error:" in result.output and str(folder) in result.output


def test_status_and_report_of_a_run(runner, tmp_path):
    """A run folder with results written as the actors write them (no images needed for the counts)."""
    out = tmp_path / "run"
    rows = [ResultRow(row_id="a", status="ok", images=[str(out / "images/a/0.png")], clip_t=[20.0], clip_r=[10.0],
                      clip_i=[80.0], clip_i_crop=[70.0], dino=[60.0], relation="hugging"),
            ResultRow(row_id="b", status="ok", images=[str(out / f"images/b/{k}.png") for k in range(2)],
                      clip_t=[30.0, 40.0], clip_r=[20.0, 30.0], clip_i=[90.0, 70.0], clip_i_crop=[80.0, 60.0],
                      dino=[50.0, 40.0]),
            ResultRow(row_id="c", status="error", error="subjects[0].image 'x.png' could not be read")]
    write_results(rows, str(out / "results" / "part-1.parquet"))
    result = invoke(runner, "batch", "status", out)
    assert result.exit_code == 0, result.output
    st = json.loads(result.output)
    assert (st["ok"], st["error"], st["images"], st["rejected"]) == (2, 1, 3, 0)
    assert st["mean_clip_t"] == 30.0 and st["mean_dino"] == 50.0
    result = invoke(runner, "batch", "report", out)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out / "report.html")
    page = (out / "report.html").read_text()
    assert 'src="images/b/1.png"' in page and "could not be read" in page


# ---- batch submit: whole-file problems fail before Ray starts ----------------------------------------------------
@pytest.mark.parametrize("case", ["not-parquet", "missing-columns", "actors"])
def test_submit_fails_fast_on_a_bad_manifest(runner, tmp_path, case):
    manifest = tmp_path / "m.parquet"
    if case == "not-parquet":
        manifest.write_bytes(b"PK\x03\x04 a zip file")
    elif case == "missing-columns":
        pq.write_table(pa.table({"row_id": ["r1"], "prompt": ["a dog"]}), manifest)
    else:
        manifest = EXAMPLE
    extra = ["--actors", 0] if case == "actors" else []
    result = invoke(runner, "batch", "submit", manifest, "--output", tmp_path / "out", *extra)
    assert result.exit_code == 2, result.output
    expected = {"not-parquet": "not a readable Parquet file",
                "missing-columns": "missing required columns ['subjects']",
                "actors": "--actors must be >= 1, got 0"}[case]
    assert "error:" in result.output and expected in result.output
    assert not (tmp_path / "out" / "run.json").exists()
