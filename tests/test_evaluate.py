"""RelationBench evaluation: configurations, LoRA checks, aggregation and bootstrap, reports, and a small run end to
end on a local Ray (two configurations, tiny preset)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke
from PIL import Image

from batch.eval_report import tables_markdown
from batch.evaluate import (
    METRICS,
    Configuration,
    EvalConfig,
    aggregate,
    bootstrap_ci,
    image_records,
    job_config,
    parse_configuration,
    parse_configurations,
    plan,
    row_counts,
    summarize,
)
from manifests import storage
from manifests.io import read_manifest
from manifests.ledger import ledger_records
from manifests.relationbench import build_cases, subjects_from_dir
from manifests.schema import ResultRow

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ROOT / "manifests" / "examples" / "subjects"
EXAMPLE_LORAS = ROOT / "manifests" / "examples" / "loras"


def alias_registry(root: Path, relations: list[str]) -> str:
    """A LoRA registry whose registry.json maps each relation to one of the example LoRA files."""
    sources = sorted(EXAMPLE_LORAS.glob("*/pytorch_lora_weights.safetensors"))
    root.mkdir(parents=True, exist_ok=True)
    mapping = {r: str(sources[i % len(sources)]) for i, r in enumerate(relations)}
    (root / "registry.json").write_text(json.dumps({"relations": mapping}))
    return str(root)


# ---- configurations -----------------------------------------------------------------------------------------
def test_configurations_are_named_switches():
    assert parse_configuration("base", None) == Configuration("base", None)
    assert parse_configuration("lora", "s3://b/loras") == Configuration("lora", "s3://b/loras")
    assert parse_configuration("no-local-tokens", "/r") == Configuration("no-local-tokens", "/r", False)
    assert parse_configuration("no-kml=s3://b/loras-nokml", None) == Configuration("no-kml", "s3://b/loras-nokml")
    assert (parse_configuration(" x=s3://b/l:no-local-tokens ", "/other")
            == Configuration("x", "s3://b/l", use_local_tokens=False))
    with pytest.raises(ValueError, match="needs a LoRA registry"):
        parse_configuration("lora", None)
    with pytest.raises(ValueError, match=r"one of \['base', 'lora', 'no-local-tokens'\].*'loras'"):
        parse_configuration("loras", "/r")
    with pytest.raises(ValueError, match="config name .*'bad name'"):
        parse_configuration("bad name=/r", None)
    with pytest.raises(ValueError, match="after '='"):
        parse_configuration("x=", None)
    with pytest.raises(ValueError, match=r"distinct names, got \['base'\]"):
        parse_configurations(["base", "lora", "base=/r"], "/r")
    with pytest.raises(ValueError, match="at least one"):
        parse_configurations([], None)


def _config(tmp_path, **kw) -> EvalConfig:
    kw.setdefault("n_single", 2)
    kw.setdefault("n_multi", 2)
    return EvalConfig(subjects_dir=str(SUBJECTS), output=str(tmp_path / "eval"), **kw)


def test_plan_checks_every_needed_lora_before_running(tmp_path):
    # the example registry has hugging / shaking_hands / riding: the four drawn relations are missing
    with pytest.raises(ValueError) as info:
        plan(_config(tmp_path, configs=("base", "lora"), loras=str(EXAMPLE_LORAS)))
    msg = str(info.value)
    assert "'lora'" in msg and str(EXAMPLE_LORAS) in msg and "'playing_guitar'" in msg and "--allow-missing" in msg
    assert not (tmp_path / "eval").exists()  # nothing written before the check

    cases, runs = plan(_config(tmp_path, configs=("base", "lora"), loras=str(EXAMPLE_LORAS), allow_missing=True,
                               n_single=0, n_multi=3, relations=("hugging", "shaking_hands", "fighting")))
    assert [c.relation for c in cases] == ["shaking_hands", "hugging", "fighting"]
    base, lora = runs
    assert base.configuration.loras is None and all(r.relation is None for r in base.rows)
    assert [r.relation for r in lora.rows] == ["shaking_hands", "hugging", None]
    assert lora.without_lora == ("fighting",) and lora.output == str(tmp_path / "eval" / "runs" / "lora")
    assert [r.relation_phrase for r in base.rows] == [c.relation_phrase for c in cases]  # CLIP-R still scored

    # one LoRA folder: its relation from card.json; a registry.json under the output points to it
    cases, runs = plan(_config(tmp_path, configs=(f"hug={EXAMPLE_LORAS / 'hugging'}:no-local-tokens",),
                               n_single=0, n_multi=1, relations=("hugging",)))
    (hug,) = runs
    assert hug.configuration == Configuration("hug", str(tmp_path / "eval" / "loras" / "hug"), False)
    assert hug.registry_file == {"hugging": str(EXAMPLE_LORAS / "hugging" / "pytorch_lora_weights.safetensors")}
    job = job_config(_config(tmp_path, preset="tiny", actors=2), hug, "m.parquet")
    assert (job.manifest, job.output, job.loras, job.actors) == ("m.parquet", hug.output, hug.configuration.loras, 2)
    worker = job.worker_config()
    assert worker.use_local_tokens is False and worker.loras == hug.configuration.loras
    assert worker.output == str(tmp_path / "eval" / "runs" / "hug")
    with pytest.raises(ValueError, match="one LoRA, relation 'hugging'.*'shaking_hands'"):
        plan(_config(tmp_path, configs=(f"hug={EXAMPLE_LORAS / 'hugging'}",), n_single=0, n_multi=2,
                     relations=("hugging", "shaking_hands")))
    # a registry.json entry outside its registry is refused, with the reason, unless --allow-external-loras
    external = alias_registry(tmp_path / "alias", ["hugging"])
    conf = dict(configs=("lora",), loras=external, n_single=0, n_multi=1, relations=("hugging",))
    with pytest.raises(ValueError, match="outside the registry .allowed with --allow-external-loras"):
        plan(_config(tmp_path, **conf))
    _, (aliased,) = plan(_config(tmp_path, allow_external_loras=True, **conf))
    assert [r.relation for r in aliased.rows] == ["hugging"] and aliased.without_lora == ()
    assert job_config(_config(tmp_path, allow_external_loras=True, **conf), aliased,
                      "m.parquet").worker_config().access.allow_external_loras
    with pytest.raises(ValueError, match="holds no subject images"):
        plan(EvalConfig(subjects_dir=str(tmp_path), output=str(tmp_path / "o"), configs=("base",)))


# ---- aggregation ------------------------------------------------------------------------------------------------
def test_bootstrap_ci_is_deterministic_and_has_the_right_width():
    rng = np.random.default_rng(7)
    values = rng.normal(30.0, 4.0, size=400)
    low, high = bootstrap_ci(values)
    assert bootstrap_ci(values) == (low, high)  # fixed seed: the same interval
    assert low < values.mean() < high
    half = 1.96 * values.std(ddof=1) / math.sqrt(values.size)  # the normal-theory half width
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    low4, high4 = bootstrap_ci(values[:100])
    assert (high4 - low4) == pytest.approx(2 * (high - low), rel=0.35)  # a quarter of the data: twice as wide
    narrow = bootstrap_ci(values, confidence=0.5)
    assert low < narrow[0] < narrow[1] < high
    assert bootstrap_ci(values, seed=1) != (low, high)
    assert bootstrap_ci([12.5, 12.5, 12.5]) == (12.5, 12.5)
    assert bootstrap_ci([3.0]) == (3.0, 3.0)
    for bad, match in (([], "non-empty"), ([[1.0]], "1-D")):
        with pytest.raises(ValueError, match=match):
            bootstrap_ci(bad)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=1.0)


def _result(row_id: str, status: str = "ok", **metrics) -> dict:
    n = len(metrics.get("clip_t", []))
    return ResultRow(row_id=row_id, status=status, error="boom" if status == "error" else None,
                     images=[f"/o/{row_id}/{k}.png" for k in range(n)], **metrics).model_dump()


def test_aggregation_of_crafted_results():
    cases = build_cases(subjects_from_dir(str(SUBJECTS)), n_single=3, n_multi=2, seed=0)
    ids = [c.row_id for c in cases]  # rb-single-0000..2 (playing_guitar, playing_piano, eating_dinner), rb-multi-*
    full = dict(clip_r=[10.0], clip_i=[70.0], clip_i_crop=[60.0], dino=[50.0])
    results = {
        "base": [_result(ids[0], clip_t=[20.0], **full),
                 _result(ids[1], clip_t=[30.0, 26.0], clip_r=[11.0, 13.0], clip_i=[71.0, 73.0],
                         clip_i_crop=[1.0, 2.0], dino=[51.0, 53.0]),
                 _result(ids[2], "error"),
                 _result(ids[3], clip_t=[22.0], **full)],  # ids[4] has no result
        "lora": [_result(i, clip_t=[25.0 + j], clip_r=[], clip_i=[], clip_i_crop=[], dino=[])
                 for j, i in enumerate(ids)],
    }
    records = image_records(cases, results)
    assert len(records) == 4 + 5
    assert {(r["config"], r["row_id"], r["k"]) for r in records if r["config"] == "base"} == {
        ("base", ids[0], 0), ("base", ids[1], 0), ("base", ids[1], 1), ("base", ids[3], 0)}
    counts = row_counts(cases, results)
    assert counts["base"] == {"single": dict(cases=3, ok=2, error=1, missing=0),
                              "multi": dict(cases=2, ok=1, error=0, missing=1)}
    assert counts["lora"]["single"] == dict(cases=3, ok=3, error=0, missing=0)

    cells = summarize(records, ("config", "kind"), resamples=200)
    index = {(c["config"], c["kind"], c["metric"]): c for c in cells}
    assert index[("base", "single", "clip_t")]["mean"] == round((20 + 30 + 26) / 3, 4)
    assert index[("base", "single", "clip_t")]["n"] == 3
    assert index[("base", "single", "dino")]["mean"] == round((50 + 51 + 53) / 3, 4)
    assert index[("base", "multi", "clip_r")]["mean"] == 10.0 and index[("base", "multi", "clip_r")]["n"] == 1
    assert index[("lora", "single", "clip_t")]["mean"] == 26.0  # 25, 26, 27
    assert ("lora", "single", "clip_r") not in index  # no values: no cell
    assert [(c["config"], c["kind"]) for c in cells][:1] == [("base", "single")]
    assert [c["config"] for c in cells].index("lora") > max(i for i, c in enumerate(cells) if c["config"] == "base")
    for c in cells:
        assert c["ci_low"] <= c["mean"] <= c["ci_high"]
    per_relation = summarize(records, ("config", "kind", "relation"), resamples=200)
    guitar = [c for c in per_relation if c["config"] == "base" and c["relation"] == "playing_guitar"]
    assert {c["metric"]: c["mean"] for c in guitar} == {"clip_t": 20.0, "clip_r": 10.0, "clip_i": 70.0, "dino": 50.0}
    assert [c["relation"] for c in per_relation if c["config"] == "lora" and c["metric"] == "clip_t"] == [
        "playing_guitar", "playing_piano", "eating_dinner", "playing_chess", "partner_dancing"]  # Table 10 order

    table = tables_markdown(cells, ["base", "lora"], counts)
    header, _, base_row, lora_row = table.splitlines()[2:6]
    assert header.startswith("| Configuration | Single-object CLIP-T | CLIP-R | CLIP-I | DINO | n | Multi-object")
    assert base_row.startswith("| base | 25.33 [") and "| 3 |" in base_row
    assert lora_row.startswith("| lora | **26.00 [")  # the best single-object CLIP-T
    # a tie is no maximum: equal means bold nothing (the tiny preset's CLIP-T is 0 for every configuration)
    tied = [dict(c, mean=0.0, ci_low=0.0, ci_high=0.0) for c in cells if c["metric"] == "clip_t"]
    assert "**" not in tables_markdown(tied, ["base", "lora"], counts)
    assert "base: single 2/3 ok, 1 error, 0 without result; multi 1/2 ok, 0 error, 1 without result" in table
    # a miniature preset says what its scores mean, under the table; a real one adds nothing
    assert "Preset" not in table and tables_markdown(cells, ["base", "lora"], counts, preset="sdxl") == table
    toy = tables_markdown(cells, ["base", "lora"], counts, preset="toy")
    assert toy.startswith(table) and toy.rstrip().endswith("card.json.") and "random DINO (they mean nothing)" in toy
    assert "These images are noise" in tables_markdown(cells, ["base", "lora"], counts, preset="tiny")


def test_href_is_relative_where_it_can_be():
    assert storage.href("/x/eval/runs/a/images/r/0.png", "/x/eval") == "runs/a/images/r/0.png"
    assert storage.href("/x/subjects/dog.png", "/x/eval") == "../subjects/dog.png"
    assert storage.href("s3://b/eval/runs/a/0.png", "s3://b/eval/") == "runs/a/0.png"
    assert storage.href("s3://b/subjects/dog.png", "s3://b/eval") == "s3://b/subjects/dog.png"


def test_reports_of_crafted_runs_on_s3(s3_bucket):
    """aggregate() reads each run's results from the store and writes every report there (fsspec, no Ray)."""
    from manifests.io import write_results

    cases = build_cases(subjects_from_dir(str(SUBJECTS)), n_single=1, n_multi=1, seed=0)
    out = f"{s3_bucket}/eval"
    metrics = {"a": (20.0, 30.0), "b": (24.0, 10.0)}
    for name, (single, multi) in metrics.items():
        rows = [ResultRow(row_id=c.row_id, status="ok", images=[f"{out}/runs/{name}/images/{c.row_id}/0.png"],
                          clip_t=[v], clip_r=[v / 2], clip_i=[v + 50], clip_i_crop=[v], dino=[v + 40])
                for c, v in zip(cases, (single, multi))]
        write_results(rows, f"{out}/runs/{name}/results/part-0.parquet")
    report = aggregate(out, ["a", "b"], cases, preset="sdxl", resamples=100)
    assert set(report["files"]) >= {"tables.md", "tables.csv", "per_relation.md", "per_relation.csv",
                                    "gallery.html", "plots/clip_t.png", "runs/a/report.html"}
    assert all(uri.startswith(out + "/") and storage.exists(uri) for uri in report["files"].values())
    table = list(csv.DictReader(io.StringIO(storage.read_bytes(f"{out}/tables.csv").decode())))
    got = {(t["config"], t["kind"], t["metric"]): float(t["mean"]) for t in table}
    assert got[("a", "single", "clip_t")] == 20.0 and got[("b", "multi", "dino")] == 50.0
    assert got[("b", "single", "clip_r")] == 12.0 and len(got) == 2 * 2 * len(METRICS)
    gallery = storage.read_bytes(f"{out}/gallery.html").decode()
    assert f'src="runs/b/images/{cases[1].row_id}/0.png"' in gallery  # relative inside the store
    assert f'src="{cases[0].subjects[0].image}"' in gallery  # a local subject image from an s3 page: as is
    assert "images are noise" not in gallery  # not the tiny preset
    png = storage.read_bytes(f"{out}/plots/dino.png")
    assert Image.open(io.BytesIO(png)).format == "PNG"


def readme_command(marker: str) -> list[str]:
    """The README's ``dreamrelation ...`` command (a fenced line holding ``marker``, with its continuation lines) as
    argv without the program name."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
        for command in block.replace("\\\n", " ").splitlines():
            if command.startswith("dreamrelation ") and marker in command:
                return shlex.split(command)[1:]
    raise AssertionError(f"no README command holds {marker!r}")


# ---- end to end on Ray --------------------------------------------------------------------------------------------
def _read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


@pytest.mark.slow
@pytest.mark.ray
def test_the_readme_evaluation_end_to_end(ray_local, runner, tmp_path, monkeypatch):
    """The README's local `eval relationbench` line typed literally in a fresh folder that sees the project's
    examples (2 two-subject cases; base and lora = the example registry; tiny preset, 64x64, 2 steps): the tables
    equal the means recomputed from the per-row results (CSV numbers rounded to 4 decimals); a rerun resumes."""
    args = readme_command("eval relationbench manifests/examples/subjects")
    (tmp_path / "manifests").symlink_to(ROOT / "manifests")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "eval"
    result = invoke(runner, *args)
    assert result.exit_code == 0, result.output
    assert "| base |" in result.output and "| lora |" in result.output

    cases, rejected = read_manifest(str(out / "cases.parquet"))
    assert not rejected and [c.row_id for c in cases] == ["rb-multi-0000", "rb-multi-0001"]
    assert sorted(c.relation for c in cases) == ["hugging", "shaking_hands"]
    assert all((c.steps, c.width, c.height) == (2, 64, 64) for c in cases)
    kinds = {c.row_id: c.row_id.split("-")[1] for c in cases}
    relation = {c.row_id: c.relation for c in cases}
    per_config = {}
    for name in ("base", "lora"):
        rows = ledger_records(str(out / "runs" / name))
        assert sorted(r["row_id"] for r in rows) == sorted(kinds) and all(r["status"] == "ok" for r in rows)
        per_config[name] = {r["row_id"]: r for r in rows}
    assert all(r["relation"] is None for r in per_config["base"].values())  # base: no relation LoRA
    assert all(r["relation"] == relation[i] for i, r in per_config["lora"].items())
    base_img = storage.read_bytes(per_config["base"]["rb-multi-0000"]["images"][0])
    lora_img = storage.read_bytes(per_config["lora"]["rb-multi-0000"]["images"][0])
    assert np.abs(np.asarray(Image.open(io.BytesIO(base_img)), dtype=float)
                  - np.asarray(Image.open(io.BytesIO(lora_img)), dtype=float)).mean() > 0.5  # the LoRA acts

    # the tables: recomputed means over images, per configuration and kind, and per relation
    table = _read_csv(out / "tables.csv")
    assert list(table[0]) == ["config", "kind", "metric", "mean", "ci_low", "ci_high", "n"]
    assert {(t["config"], t["kind"], t["metric"]) for t in table} == {
        (c, "multi", m) for c in ("base", "lora") for m in METRICS}
    for t in table:
        values = [v for i, r in per_config[t["config"]].items() if kinds[i] == t["kind"] for v in r[t["metric"]]]
        assert int(t["n"]) == len(values) == 2
        assert float(t["mean"]) == round(math.fsum(values) / len(values), 4)
        assert float(t["ci_low"]) <= float(t["mean"]) <= float(t["ci_high"])
        assert min(values) - 1e-4 <= float(t["ci_low"]) and float(t["ci_high"]) <= max(values) + 1e-4
    by_relation = _read_csv(out / "per_relation.csv")
    assert len(by_relation) == 2 * 2 * len(METRICS)
    for t in by_relation:
        (i,) = [i for i in kinds if relation[i] == t["relation"]]
        assert float(t["mean"]) == round(per_config[t["config"]][i][t["metric"]][0], 4) and t["n"] == "1"
    md = (out / "tables.md").read_text()
    for t in table:
        assert f"{float(t['mean']):.2f} [{float(t['ci_low']):.2f}, {float(t['ci_high']):.2f}]" in md
    assert "| shaking_hands | multi |" in (out / "per_relation.md").read_text()

    for m in METRICS:  # plots: real PNG images
        with Image.open(out / "plots" / f"{m}.png") as im:
            assert im.format == "PNG" and im.size[0] >= 600
    gallery = (out / "gallery.html").read_text()
    assert "images are noise" in gallery
    assert gallery.count("<tr>") == 1 + len(cases)
    for name in ("base", "lora"):
        for r in per_config[name].values():
            rel = r["images"][0][len(str(out)) + 1:]
            assert f'src="{rel}"' in gallery and (out / rel).is_file()
    for case in cases:  # subject thumbnails: relative to the gallery's folder
        for subject in case.subjects:
            assert f'src="{os.path.relpath(subject.image, out)}"' in gallery
    assert (out / "runs" / "base" / "report.html").is_file()
    summary = json.loads((out / "eval.json").read_text())
    assert summary["rows"]["lora"]["multi"] == dict(cases=2, ok=2, error=0, missing=0)
    assert [c["name"] for c in summary["configs"]] == ["base", "lora"]
    assert summary["configs"][0]["manifest"] == str(out / "manifests" / "base.parquet")

    # a rerun resumes: nothing is generated again and the tables come out identical (deterministic bootstrap)
    before = (out / "tables.csv").read_text()
    result = invoke(runner, *args)
    assert result.exit_code == 0, result.output
    again = json.loads((out / "eval.json").read_text())
    assert [c["run"]["skipped"] for c in again["configs"]] == [2, 2]
    assert [c["run"]["ok"] for c in again["configs"]] == [0, 0]
    assert (out / "tables.csv").read_text() == before
    # the same output with other cases (another seed) would mix results: refused
    result = invoke(runner, *args, "--seed", 1)
    assert result.exit_code == 2 and "different cases" in result.output
    result = invoke(runner, *args, "--preset", "sdxl")  # so would other settings of a configuration
    assert result.exit_code == 2 and "'base'" in result.output and "preset: 'tiny' in the run, 'sdxl' now" in result.output


def test_cli_errors_before_running(runner, tmp_path):
    out = tmp_path / "eval"
    result = invoke(runner, "eval", "relationbench", SUBJECTS, "--output", out)
    assert result.exit_code == 2 and "--config" in result.output
    result = invoke(runner, "eval", "relationbench", SUBJECTS, "--config", "lora", "--loras", EXAMPLE_LORAS,
                    "--output", out, "--n-single", 0, "--n-multi", 2)
    assert result.exit_code == 2 and "'playing_chess'" in result.output and str(EXAMPLE_LORAS) in result.output
    result = invoke(runner, "eval", "relationbench", SUBJECTS, "--config", "base", "--output", out,
                    "--relations", "hugging", "--size", 60)
    assert result.exit_code == 2 and "--size" in result.output
    result = invoke(runner, "eval", "relationbench", SUBJECTS, "--config", "base", "--output", out,
                    "--relations", "hugging")
    assert result.exit_code == 2 and "--n-single is 100; pass --n-single 0" in result.output
    assert not out.exists()

