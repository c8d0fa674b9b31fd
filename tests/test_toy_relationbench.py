"""`eval relationbench --cases`: ready-made cases (the toy world's RelationBench-style cases) instead of SUBJECTS_DIR,
judged by the toy world's exact oracle (Identity %, Relation %) next to the paper's metrics; per-relation order for
any relation id; and a short run of the shipped toy preset end to end on a local Ray."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import invoke
from PIL import Image

from batch.eval_report import per_relation_markdown, tables_markdown
from batch.evaluate import (
    METRICS,
    ORACLE_METRICS,
    TOY_BENCHMARK,
    EvalConfig,
    aggregate,
    benchmark,
    image_records,
    plan,
    summarize,
)
from batch.toy_oracle import toy_question
from dreamrelation.model.preset_names import TOY_MODEL_DIR
from dreamrelation.toy import oracle, world
from manifests import storage
from manifests.io import MANIFEST_SCHEMA, read_manifest, write_results, write_table
from manifests.ledger import ledger_records
from manifests.relationbench import (
    build_cases,
    read_cases,
    relation_sort_key,
    subjects_from_dir,
)
from manifests.schema import ResultRow
from manifests.toy_data import write_toy_relationbench

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ROOT / "manifests" / "examples" / "subjects"
TOY_ORDER = [r.id for r in world.RELATIONS]
# the end-to-end run: `data toy-world --n 4 --seed 3` (4 single + 4 multi cases), base configuration, 25 steps
FLOOR_RELATION = 10.0  # % of images with the relation holding; measured: 25.0 (2 of 8: 1 of 4 single, 1 of 4 multi)


@pytest.fixture(scope="module")
def toy_cases(tmp_path_factory) -> str:
    """3 single + 3 multi toy-world cases (seed 0); their cases.parquet URI."""
    return write_toy_relationbench(str(tmp_path_factory.mktemp("toy-cases")), n_single=3, n_multi=3, seed=0)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _crafted_run(out: Path, name: str, cases, image_of) -> None:
    """A finished run of ``name`` under ``out/runs``: one ok result per case, its image ``image_of(case)``."""
    rows = []
    for i, case in enumerate(cases):
        uri = str(out / "runs" / name / "images" / case.row_id / "0.png")
        storage.write_bytes_atomic(uri, _png(image_of(case)))
        rows.append(ResultRow(row_id=case.row_id, status="ok", images=[uri], clip_t=[20.0 + i], clip_r=[10.0],
                              clip_i=[70.0], clip_i_crop=[60.0], dino=[50.0]))
    write_results(rows, str(out / "runs" / name / "results" / "part-0.parquet"))


def _reference(case) -> Image.Image:
    """The render the case describes (``metadata["reference"]``, relative to the cases' folder)."""
    return Image.open(Path(case.subjects[0].image).parents[1] / case.metadata["reference"]).convert("RGB")


def _blank(case) -> Image.Image:
    return Image.new("RGB", (case.width, case.height), world.BACKGROUND)


# ---- the oracle's columns -------------------------------------------------------------------------------------
def test_oracle_columns_of_crafted_toy_runs(toy_cases, tmp_path):
    """The renders themselves: 100% identity and relation; blank images: 0%; RelationBench's tables unchanged."""
    cases = read_cases(toy_cases)
    assert [c.metadata["kind"] for c in cases] == ["single"] * 3 + ["multi"] * 3
    assert all(toy_question(c) is not None for c in cases) and benchmark(cases) == TOY_BENCHMARK
    out = tmp_path / "eval"
    _crafted_run(out, "renders", cases, _reference)
    _crafted_run(out, "blank", cases, _blank)
    report = aggregate(str(out), ["renders", "blank"], cases, preset="toy", resamples=100)
    assert report["benchmark"] == TOY_BENCHMARK
    cells = {(c["config"], c["kind"], c["metric"]): c for c in report["table"]}
    for kind in ("single", "multi"):
        for m in ORACLE_METRICS:
            assert cells[("renders", kind, m)] == {"config": "renders", "kind": kind, "metric": m, "mean": 100.0,
                                                       "ci_low": 100.0, "ci_high": 100.0, "n": 3}
            assert cells[("blank", kind, m)]["mean"] == 0.0
        assert cells[("renders", kind, "clip_r")]["mean"] == 10.0  # the paper's metrics as before
    # the same verdicts as the oracle on the files
    for rec in image_records(cases, {"blank": ledger_records(str(out / "runs" / "blank"))}):
        case = next(c for c in cases if c.row_id == rec["row_id"])
        v = oracle.judge(Image.open(rec["image"]), [s.phrase for s in case.subjects], case.relation)
        assert (rec["oracle_identity"], rec["oracle_relation"]) == (100.0 * all(v.identity), 100.0 * v.relation)

    table = (out / "tables.md").read_text()
    assert table.startswith(f"# RelationBench: {TOY_BENCHMARK}\n")
    header = table.splitlines()[2]
    assert header.startswith("| Configuration | Single-object CLIP-T | CLIP-R | CLIP-I | DINO | Identity % | "
                             "Relation % | n | Multi-object CLIP-T")
    assert "| renders | " in table and "100.00 [100.00, 100.00]" in table and "Identity % and Relation %" in table
    rows = list(csv.DictReader((out / "tables.csv").open()))
    assert {r["metric"] for r in rows} == {*METRICS, *ORACLE_METRICS}
    by_relation = list(csv.DictReader((out / "per_relation.csv").open()))
    order = [r["relation"] for r in by_relation if r["config"] == "renders" and r["metric"] == "oracle_relation"]
    assert order == sorted({c.relation for c in cases}, key=TOY_ORDER.index)  # world.RELATIONS order
    assert "## Relation %" in (out / "per_relation.md").read_text()
    for m in ORACLE_METRICS:
        with Image.open(out / "plots" / f"{m}.png") as im:
            assert im.format == "PNG"
    gallery = (out / "gallery.html").read_text()
    assert gallery.count("Identity yes · Relation yes") == 6 and gallery.count("Identity no · Relation no") == 6
    assert f"<h1>RelationBench: {TOY_BENCHMARK}" in gallery and 'href="plots/oracle_relation.png"' in gallery


def test_relationbench_cases_get_no_oracle_columns(toy_cases):
    cases = build_cases(subjects_from_dir(str(SUBJECTS)), n_single=1, n_multi=1, seed=0)
    assert benchmark(cases) == "RelationBench" and all(toy_question(c) is None for c in cases)
    toy = read_cases(toy_cases)[:1]
    assert benchmark(cases + toy) == "RelationBench + toy-world (1 of 3 cases oracle-judged)"
    assert tables_markdown([], ["a"], {}, benchmark=benchmark(cases + toy)).startswith(
        "# RelationBench + toy-world (1 of 3 cases oracle-judged)\n")
    records = [{"config": "a", "row_id": c.row_id, "kind": k, "relation": c.relation, "k": 0, "image": "x",
                "clip_t": 1.0, "clip_r": None, "clip_i": None, "dino": None}
               for c, k in zip(cases, ("single", "multi"))]
    cells = summarize(records, ("config", "kind"), resamples=10)
    assert {c["metric"] for c in cells} == {"clip_t"}
    table = tables_markdown(cells, ["a"], {})
    assert table.startswith("# RelationBench\n") and "Identity" not in table


# ---- per-relation order ---------------------------------------------------------------------------------------
def test_relations_are_ordered_for_any_id():
    ids = ["zebra_crossing", "in_a_row", None, "hugging", "on_the_ground", "playing_guitar", "next_to", "alpha"]
    assert sorted(ids, key=relation_sort_key) == ["playing_guitar", "hugging", "on_the_ground", "next_to",
                                                  "in_a_row", "alpha", "zebra_crossing", None]
    records = [{"config": "c", "kind": "multi" if world.relation(r).arity > 1 else "single", "relation": r,
                "clip_t": 1.0, "oracle_relation": 100.0} for r in reversed(TOY_ORDER)]
    cells = summarize(records, ("config", "kind", "relation"), resamples=10)
    assert [c["relation"] for c in cells if c["metric"] == "clip_t"] == TOY_ORDER
    text = per_relation_markdown(cells, ["c"], TOY_BENCHMARK)
    assert text.startswith(f"# RelationBench: {TOY_BENCHMARK} by relation")
    listed = [line.split(" | ")[0].removeprefix("| ") for line in text.split("## Relation %")[1].splitlines()]
    assert [r for r in listed if r in TOY_ORDER] == TOY_ORDER


# ---- --cases: the options -------------------------------------------------------------------------------------
def test_cases_options(toy_cases, tmp_path):
    """--relations keeps rows of those relations; --steps / --num-images go to every case, --size only when given;
    unknown relations, rejected rows and SUBJECTS_DIR with --cases are one-line errors."""
    base = {"cases": toy_cases, "output": str(tmp_path / "eval"), "configs": ("base",)}
    cases, (run,) = plan(EvalConfig(**base, relations=("next_to", "floating"), steps=7, num_images=2))
    assert sorted({c.relation for c in cases}) == ["floating", "next_to"]
    assert all((c.steps, c.num_images, c.width, c.height) == (7, 2, 64, 64) for c in cases)
    assert all(r.relation is None for r in run.rows)  # base: no LoRA
    originals = {c.row_id: c for c in read_manifest(toy_cases)[0]}
    assert all(c.seed == originals[c.row_id].seed and c.prompt == originals[c.row_id].prompt for c in cases)
    cases, _ = plan(EvalConfig(**base, width=128, height=128))
    assert len(cases) == 6 and all((c.width, c.height) == (128, 128) for c in cases)
    with pytest.raises(ValueError, match=r"--relations: \['hugging'\] not among the relations of --cases .*"
                                         r"they have \['on_the_ground', 'floating', 'in_the_middle', 'next_to'"):
        plan(EvalConfig(**base, relations=("next_to", "hugging")))
    with pytest.raises(ValueError, match="exactly one of SUBJECTS_DIR and --cases, got both"):
        EvalConfig(**base, subjects_dir=str(SUBJECTS))
    with pytest.raises(ValueError, match="exactly one of SUBJECTS_DIR and --cases, got neither"):
        EvalConfig(output=str(tmp_path))
    assert EvalConfig(cases="c.parquet").cases == str(Path("c.parquet").resolve())

    rows = [r.model_dump() for r in read_manifest(toy_cases)[0]]
    rows[2]["steps"] = 0
    bad = str(tmp_path / "bad.parquet")
    write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), bad)
    with pytest.raises(ValueError) as info:
        read_cases(bad)
    assert str(info.value).startswith(f"--cases {bad}: 1 invalid row(s); the first, row 2 (rb-single-0002): steps")
    assert "\n" not in str(info.value)


def test_cli_cases_errors(runner, toy_cases, tmp_path):
    out = tmp_path / "eval"
    for args, said in (((SUBJECTS, "--cases", toy_cases), "got both"), ((), "got neither"),
                       (("--cases", toy_cases, "--n-single", 3), "--n-single 3 does not apply to --cases"),
                       (("--cases", toy_cases, "--seed", 1), "--seed 1 does not apply to --cases"),
                       (("--cases", toy_cases, "--relations", "hugging"), "they have ['on_the_ground'"),
                       (("--cases", str(tmp_path / "none.parquet")), "none.parquet")):
        result = invoke(runner, "eval", "relationbench", *args, "--config", "base", "--output", out)
        assert result.exit_code == 2 and said in " ".join(result.output.split()), (args, result.output)
    assert "SUBJECTS_DIR and --cases" in invoke(runner, "eval", "relationbench", "--config", "base").output
    assert not out.exists()
    assert "--cases" in invoke(runner, "eval", "relationbench", "--help").output


# ---- end to end on Ray: the shipped toy preset ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(not (TOY_MODEL_DIR / "model_index.json").is_file(),
                    reason=f"no toy preset weights in {TOY_MODEL_DIR}")
def test_toy_cases_end_to_end(ray_local, runner, tmp_path):
    """The README's lines, typed literally in a scratch folder: `data toy-world --kind relationbench` then `eval
    relationbench --cases` with the toy preset: the tables hold the oracle's columns, equal to the oracle on the
    written images; CLIP-T is the toy CLIP's (not ~0)."""
    from test_evaluate import readme_command

    make, args = readme_command("--kind relationbench --n 4"), readme_command("eval relationbench --cases")
    data, out = tmp_path / make[2], tmp_path / args[args.index("--output") + 1]
    make[2] = str(data)
    args[args.index("--cases") + 1] = str(data / "relationbench.parquet")
    args[args.index("--output") + 1] = str(out)
    result = invoke(runner, *make)
    assert result.exit_code == 0, result.output
    result = invoke(runner, *args)
    assert result.exit_code == 0, result.output
    assert f"# RelationBench: {TOY_BENCHMARK}" in result.output and "Identity % | Relation %" in result.output

    cases, rejected = read_manifest(str(out / "cases.parquet"))
    assert not rejected and len(cases) == 8 and all((c.steps, c.width) == (25, 64) for c in cases)
    rows = {r["row_id"]: r for r in ledger_records(str(out / "runs" / "base"))}
    assert sorted(rows) == sorted(c.row_id for c in cases) and all(r["status"] == "ok" for r in rows.values())
    table = {(t["config"], t["kind"], t["metric"]): t for t in csv.DictReader((out / "tables.csv").open())}
    for kind in ("single", "multi"):
        verdicts = [oracle.judge(Image.open(rows[c.row_id]["images"][0]), [s.phrase for s in c.subjects], c.relation)
                    for c in cases if c.metadata["kind"] == kind]
        for m, values in (("oracle_identity", [100.0 * all(v.identity) for v in verdicts]),
                          ("oracle_relation", [100.0 * v.relation for v in verdicts])):
            cell = table[("base", kind, m)]
            assert float(cell["mean"]) == round(math.fsum(values) / len(values), 4) and cell["n"] == "4"
        assert float(table[("base", kind, "clip_t")]["mean"]) > 5.0  # the toy CLIP (the tiny preset's: ~0)
    judged = [float(table[("base", k, "oracle_relation")]["mean"]) for k in ("single", "multi")]
    assert sum(judged) / 2 >= FLOOR_RELATION, judged
    summary = json.loads((out / "eval.json").read_text())
    assert summary["benchmark"] == TOY_BENCHMARK and summary["settings"]["cases"] == str(data / "relationbench.parquet")
    assert {c["metric"] for c in summary["table"]} >= set(ORACLE_METRICS)
    assert "Identity" in (out / "gallery.html").read_text()
    # the same output with other cases would mix results: refused
    result = invoke(runner, *args, "--relations", "next_to")
    assert result.exit_code == 2 and "different cases" in result.output
