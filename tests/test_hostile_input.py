"""Hostile input and secrets: nothing leaks, nothing explodes, every failure is one clear line.

Manifests, images, specs, registry files and URLs are untrusted; model and LoRA files are loaded as safetensors only.
One place for every case: malformed files, bad rows, traversal ids, files that are not images, pickles posing as
LoRAs, decompression bombs, runaway rows, rows that kill their actor, URLs a manifest must not make us fetch,
mistyped buckets, outputs that cannot be written, and the canary credentials of the test S3 server, which must not
appear in any file Ray, a run or an export writes."""

from __future__ import annotations

import http.server
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CANARY_KEY_ID, CANARY_SECRET

from manifests import storage
from manifests.access import AccessPolicy, private_address
from manifests.io import MANIFEST_SCHEMA, read_manifest, write_manifest
from manifests.validation import check_image_file, row_cost

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "manifests" / "examples" / "example.parquet"
LORAS = ROOT / "manifests" / "examples" / "loras"
DOG = ROOT / "manifests" / "examples" / "subjects" / "dog.png"
CLI = [sys.executable, str(ROOT / "cli.py")]


def base_row() -> dict:
    rows, _ = read_manifest(str(EXAMPLE))
    return {**rows[0].model_dump(), "width": 64, "height": 64, "steps": 2}


def write_rows(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), path)
    return path


def validate(path: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "manifest", "validate", str(path), *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def one_line_error(r: subprocess.CompletedProcess, code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def png_bomb(path: Path, width: int = 13000, height: int = 13000) -> Path:
    """A valid greyscale PNG of ``width`` x ``height`` zeros: ~160 KB on disk, 169 MB once decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    compressor, row, parts = zlib.compressobj(9), b"\0" * (width + 1), []
    for _ in range(height):
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts))
                     + chunk(b"IEND", b""))
    return path


# ---- files that are not manifests --------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"row_id,prompt\n1,a dog\n", b"PAR1" + b"\0" * 40, b""])
def test_a_file_that_is_not_parquet_is_one_line_naming_it(tmp_path, content):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(content)
    assert "bad.parquet" in one_line_error(validate(bad), 2)
    r = subprocess.run([*CLI, "batch", "submit", str(bad), "--output", str(tmp_path / "out")], capture_output=True,
                       text=True, timeout=300)
    assert "bad.parquet" in one_line_error(r, 2)
    assert not (tmp_path / "out").exists()


def test_a_truncated_manifest_and_missing_columns(tmp_path):
    good = write_manifest([base_row()], str(tmp_path / "good.parquet"))
    data = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    assert "cut.parquet" in one_line_error(validate(tmp_path / "cut.parquet"), 2)
    pq.write_table(good.drop_columns(["subjects"]), tmp_path / "cols.parquet")
    line = one_line_error(validate(tmp_path / "cols.parquet"), 2)
    assert "missing required columns ['subjects']" in line


# ---- rows that are not what they say ---------------------------------------------------------------------------
def test_bad_rows_are_rejected_naming_the_field_and_control_characters_are_escaped(tmp_path):
    row = base_row()
    subject = row["subjects"][0]
    rows = [
        {**row, "row_id": "nan-box", "subjects": [{**subject, "box": [0.0, float("nan"), 0.5, 0.5]}]},
        {**row, "row_id": "inf-box", "subjects": [{**subject, "box": [0.0, 0.1, float("inf"), 0.5]}]},
        {**row, "row_id": "three-numbers", "subjects": [{**subject, "box": [0.0, 0.1, 0.5]}]},
        {**row, "row_id": "no-subjects", "subjects": []},
        {**row, "row_id": "nine-subjects", "subjects": [subject] * 9},
        {**row, "row_id": "../../etc/evil"},
        {**row, "row_id": "traversal-relation", "relation": "../hugging"},
        {**row, "row_id": "passwd", "subjects": [{**subject, "image": "/etc/passwd"}]},
        {**row, "row_id": "\x1b[31mred\x1b[0m"},
        {**row, "row_id": "giant", "width": 4096, "height": 4096, "steps": 200, "num_images": 16},
    ]
    manifest = write_rows(tmp_path / "m.parquet", rows)
    r = validate(manifest)
    assert r.returncode == 1
    assert "\x1b" not in r.stdout and "\\x1b[31mred" in r.stdout  # the terminal sees text, not an escape sequence
    lines = {line.split()[2]: line for line in r.stdout.splitlines()[:-1]}
    assert "REJECTED subjects.0.box" in lines["nan-box"] and "finite" in lines["nan-box"]
    assert "REJECTED subjects.0.box" in lines["inf-box"] and "REJECTED subjects.0.box" in lines["three-numbers"]
    assert "REJECTED subjects" in lines["no-subjects"] and "REJECTED subjects" in lines["nine-subjects"]
    assert "REJECTED row_id" in lines["../../etc/evil"]
    assert "REJECTED relation" in lines["traversal-relation"]
    assert "REJECTED subjects.0.image" in lines["passwd"] and "not an image" in lines["passwd"]
    giant = lines["giant"]
    assert "row cost 53,687 megapixel-steps (4096x4096 x 200 steps x 16 images)" in giant and "--max-row-cost" in giant
    assert row_cost(read_manifest(str(EXAMPLE))[0][0]) < 10  # the example rows are cheap
    assert "0 accepted, 10 rejected" in r.stdout.splitlines()[-1]


def test_a_decompression_bomb_is_refused_from_its_header_and_never_decoded(tmp_path):
    bomb = png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 300_000
    reason = check_image_file(str(bomb))
    assert "13000x13000 pixels (169.0 MP) is over the cap of 40 MP (--max-image-pixels)" in reason
    row = base_row()
    row["subjects"] = [{**row["subjects"][0], "image": str(bomb)}] * 8  # one valid row naming it 8 times
    manifest = write_rows(tmp_path / "m.parquet", [row])
    # the command's own peak: VmHWM of its process, read as it exits (ru_maxrss of a child starts at the parent's
    # high-water mark across fork + exec on Linux, i.e. at this test session's size)
    probe = ("import atexit, runpy, sys\n"
             "def hwm():\n"
             "    line = [x for x in open('/proc/self/status') if x.startswith('VmHWM')][0]\n"
             "    sys.stderr.write('VmHWM_KB=' + line.split()[1] + '\\n')\n"
             "atexit.register(hwm)\n"
             f"sys.argv = ['cli.py', 'manifest', 'validate', {str(manifest)!r}]\n"
             f"runpy.run_path({str(ROOT / 'cli.py')!r}, run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "REJECTED subjects.0.image" in r.stdout and "13000x13000" in r.stdout, r.stderr
    peak_kb = int(r.stderr.rsplit("VmHWM_KB=", 1)[1].split()[0])
    assert 20_000 < peak_kb < 1024 * 1024, f"peak {peak_kb} KB"  # under 1 GB (the bomb decodes to 169 MB)
    # a raised cap lets a large (but real) image through; the decoder enforces the same cap
    assert check_image_file(str(bomb), max_pixels=200_000_000) is None
    from batch.worker import decode_subject

    with pytest.raises(ValueError, match="13000x13000"):
        decode_subject(bomb.read_bytes(), 40_000_000)


def test_large_jpegs_are_reduced_while_decoding(tmp_path):
    from PIL import Image

    from batch.worker import SUBJECT_DECODE_SIZE, decode_subject

    buf = io.BytesIO()
    Image.new("RGB", (6000, 4000), (200, 30, 30)).save(buf, format="JPEG", quality=80)
    image = decode_subject(buf.getvalue(), 40_000_000)
    assert image.mode == "RGB" and SUBJECT_DECODE_SIZE <= min(image.size) < 4000  # decoded at a reduced scale


# ---- what a manifest may make us fetch -------------------------------------------------------------------------
def test_the_access_policy():
    default, web, private = AccessPolicy(), AccessPolicy(allow_http=True), AccessPolicy(True, True)
    for uri in ("/data/dog.png", "rel/dog.png", "s3://b/dog.png", "gs://b/d.png", "memory://x/d.png"):
        assert default.reason(uri) is None
    assert "--allow-http" in default.reason("https://example.com/dog.png")
    assert "not allowed" in default.reason("ftp://example.com/dog.png")
    assert "not allowed" in web.reason("file+ssh://x/y")
    for uri, kind in (("http://127.0.0.1/x.png", "loopback"), ("http://169.254.169.254/latest/", "link-local"),
                      ("http://10.1.2.3/x.png", "private"), ("http://[::1]/x.png", "loopback"),
                      ("http://localhost:8000/x.png", "loopback")):
        reason = web.reason(uri)
        assert reason and kind in reason and "--allow-private-urls" in reason, (uri, reason)
        assert private.reason(uri) is None
    assert private_address("93.184.216.34") is None
    assert "does not resolve" in private_address("no-such-host.invalid")


def test_http_images_only_when_allowed_and_never_private_unless_asked(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a subject image: refused by default, refused with --allow-http
    (loopback), fetched with --allow-http --allow-private-urls."""
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "dog.png").write_bytes(DOG.read_bytes())
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "www"))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dog.png"
        row = base_row()
        row["subjects"] = [{**row["subjects"][0], "image": url}]
        manifest = write_rows(tmp_path / "m.parquet", [row])
        r = validate(manifest)
        assert r.returncode == 1 and "REJECTED subjects.0.image" in r.stdout and "--allow-http" in r.stdout
        r = validate(manifest, "--allow-http")
        assert r.returncode == 1 and "loopback" in r.stdout and "--allow-private-urls" in r.stdout
        r = validate(manifest, "--allow-http", "--allow-private-urls")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "1 accepted, 0 rejected" in r.stdout
    finally:
        server.shutdown()


def test_registry_entries_outside_the_registry_or_missing_are_caught_at_validation(tmp_path):
    loras = tmp_path / "loras"
    (loras / "hugging").mkdir(parents=True)
    (loras / "hugging" / "pytorch_lora_weights.safetensors").write_bytes(
        (LORAS / "hugging" / "pytorch_lora_weights.safetensors").read_bytes())
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((LORAS / "riding" / "pytorch_lora_weights.safetensors").read_bytes())
    (loras / "registry.json").write_text(json.dumps({"relations": {"riding": str(outside), "dancing": "gone.safetensors",
                                                                   "sneaky": "../elsewhere.safetensors"}}))
    row = base_row()
    rows = [{**row, "row_id": r, "relation": r} for r in ("hugging", "riding", "dancing", "sneaky")]
    manifest = write_rows(tmp_path / "m.parquet", rows)
    r = validate(manifest, "--loras", loras)
    lines = {line.split()[2]: line for line in r.stdout.splitlines()[:-1]}
    assert " OK " in lines["hugging"]
    assert "REJECTED relation" in lines["riding"] and "--allow-external-loras" in lines["riding"]
    assert "REJECTED relation" in lines["sneaky"] and "outside the registry" in lines["sneaky"]
    assert "REJECTED relation" in lines["dancing"] and "does not exist" in lines["dancing"]
    r = validate(manifest, "--loras", loras, "--allow-external-loras")
    lines = {line.split()[2]: line for line in r.stdout.splitlines()[:-1]}
    assert " OK " in lines["riding"] and " OK " in lines["sneaky"] and "does not exist" in lines["dancing"]
    (loras / "registry.json").write_text('{"relations": 3}')
    line = one_line_error(validate(manifest, "--loras", loras), 2)
    assert "registry.json" in line and "3" in line


# ---- LoRA files that are not LoRAs: nothing is unpickled -------------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('PWNED_MARKER', '/tmp/dreamrelation-pwned')}",))


def test_a_pickle_or_a_corrupt_file_posing_as_a_lora_fails_its_rows_and_runs_nothing(tiny_dir, tmp_path, monkeypatch):
    from batch.worker import Worker, WorkerConfig

    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    loras = tmp_path / "loras"
    for name, data in (("pickled", pickle.dumps(_Payload())), ("corrupt", b"\x08\0\0\0\0\0\0\0{not json"),
                       ("tiny", b"abc")):
        (loras / name).mkdir(parents=True)
        (loras / name / "pytorch_lora_weights.safetensors").write_bytes(data)
    worker = Worker(WorkerConfig(output=str(tmp_path / "out"), preset="tiny", loras=str(loras), device="cpu",
                                 metrics=False))
    row = base_row()
    results = worker.process([{**row, "row_id": f"r-{n}", "relation": n} for n in ("pickled", "corrupt", "tiny")]
                             + [{**row, "row_id": "r-plain", "relation": None}])
    assert [r.status for r in results] == ["error", "error", "error", "ok"], [r.error for r in results]
    assert all("could not load its LoRA" in r.error for r in results[:3])
    assert not marker.exists()  # the pickle was never unpickled


# ---- outputs ---------------------------------------------------------------------------------------------------
def test_a_mistyped_bucket_is_never_created(s3_bucket, tmp_path):
    import s3fs

    missing = "s3://dr-no-such-bucket-typo/run"
    r = subprocess.run([*CLI, "batch", "submit", str(EXAMPLE), "--output", missing], capture_output=True, text=True,
                       timeout=300)
    line = one_line_error(r, 2)
    assert "bucket 'dr-no-such-bucket-typo' does not exist" in line and "--create-bucket" in line
    s3fs.S3FileSystem.clear_instance_cache()
    assert not s3fs.S3FileSystem().exists("dr-no-such-bucket-typo")
    storage.check_bucket("s3://dr-created-on-purpose/run", create=True)
    assert s3fs.S3FileSystem().exists("dr-created-on-purpose")


def test_an_output_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    r = subprocess.run([*CLI, "batch", "submit", str(EXAMPLE), "--output", str(tmp_path / "file" / "out")],
                       capture_output=True, text=True, timeout=300)
    line = one_line_error(r, 1)
    assert f"cannot write to output {tmp_path / 'file' / 'out'}" in line


def test_bad_spec_files_and_options_are_one_line_and_debug_shows_the_traceback(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("relations: [\n  - bad")
    r = subprocess.run([*CLI, "data", "generate", str(spec), "--output", str(tmp_path / "e")], capture_output=True,
                       text=True, timeout=300)
    assert "spec.yaml" in one_line_error(r, 2)
    r = subprocess.run([*CLI, "batch", "submit", str(EXAMPLE), "--max-row-cost", "-1"], capture_output=True,
                       text=True, timeout=300)
    assert "--max-row-cost must be a positive number, got -1" in one_line_error(r, 2)
    r = subprocess.run([*CLI, "batch", "status", str(tmp_path / "nothing")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "DREAMRELATION_DEBUG": "1"})
    assert r.returncode == 2 and "Traceback" in r.stderr and "no run found" in r.stderr


# ---- secrets ---------------------------------------------------------------------------------------------------
def test_secrets_never_enter_a_runtime_environment(monkeypatch):
    from manifests.runtime import forwarded_env, is_secret, ray_init_args

    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok")
    monkeypatch.setenv("HF_TOKEN", "hf")
    monkeypatch.setenv("DREAMRELATION_API_KEY", "k")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    env = forwarded_env()
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert not [k for k in env if is_secret(k)]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"} & set(env) == set()
    assert "runtime_env" not in ray_init_args(None)  # a local Ray inherits the environment: nothing to log
    assert not [k for k in ray_init_args("ray://head:10001")["runtime_env"]["env_vars"] if is_secret(k)]


def test_ray_tune_trials_get_no_credentials_in_their_runtime_environment(monkeypatch):
    """Ray Tune copies AWS_ACCESS_KEY_ID/SECRET/SESSION_TOKEN into each trial's runtime environment (and so into
    runtime_env_agent.log); the training job drops them before building its Tuner."""
    from ray.tune.execution.class_cache import _ActorClassCache

    from cluster.train_job import keep_secrets_out_of_tune

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CANARY_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_SECRET)

    class Trial:
        pass

    keep_secrets_out_of_tune()
    env_vars = _ActorClassCache().get(Trial)._default_options["runtime_env"]["env_vars"]
    assert env_vars and not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env_vars)
    assert CANARY_SECRET not in json.dumps(env_vars) and CANARY_KEY_ID not in json.dumps(env_vars)


def test_error_lines_hide_url_credentials_and_control_characters():
    from manifests.errors import one_line, printable

    line = one_line(RuntimeError(f"cannot open s3://{CANARY_KEY_ID}:{CANARY_SECRET}@bucket/x\x1b[2J\nmore"))
    assert CANARY_SECRET not in line and CANARY_KEY_ID not in line and "s3://***@bucket/x" in line
    assert "\x1b" not in line and "\n" not in line
    assert printable("a\rb\tc\u2028") == "a\\x0db\\tc\\u2028"


def _files_with(needles: list[str], roots: list[Path]) -> list[str]:
    hits = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                hits += [f"{path}: {n}" for n in needles if n.encode() in data]
    return hits


@pytest.mark.slow
@pytest.mark.ray
def test_no_canary_credential_in_rays_logs_a_run_or_its_exports(ray_local, ray_temp, s3_bucket, tmp_path):
    """The S3 server's credentials are canaries: after a run on S3 and exports to S3 and to a folder, neither the
    Ray session folder, nor any object of the bucket, nor the exports hold them."""
    from batch.job import JobConfig, submit
    from manifests.export import ExportFilter, export_run

    assert os.environ["AWS_SECRET_ACCESS_KEY"] == CANARY_SECRET  # the whole session runs on the canaries
    rows, _ = read_manifest(str(EXAMPLE))
    manifest = storage.join(s3_bucket, "m.parquet")
    write_manifest([r.model_copy(update={"width": 64, "height": 64, "steps": 2}) for r in rows[:4]], manifest)
    out = storage.join(s3_bucket, "run")
    summary = submit(JobConfig(manifest=manifest, output=out, loras=str(LORAS), actors=1))
    assert summary["run"]["rows"]["ok"] == 4
    export_run(out, "hf", storage.join(s3_bucket, "export"), ExportFilter())
    export_run(out, "webdataset", str(tmp_path / "wds"), ExportFilter())
    r = subprocess.run([*CLI, "batch", "report", out], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert CANARY_SECRET not in r.stdout + r.stderr and CANARY_KEY_ID not in r.stdout + r.stderr
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket_hits = [p for p in fs.find(s3_bucket.removeprefix("s3://"))
                   if CANARY_SECRET.encode() in fs.cat_file(p) or CANARY_KEY_ID.encode() in fs.cat_file(p)]
    assert bucket_hits == []
    assert _files_with([CANARY_SECRET, CANARY_KEY_ID], [ray_temp, tmp_path]) == []


# ---- rows that run away or kill their actor ----------------------------------------------------------------------
def test_a_row_over_its_time_limit_fails_alone(tiny_dir, tmp_path):
    from batch.worker import Worker, WorkerConfig

    worker = Worker(WorkerConfig(output=str(tmp_path), preset="tiny", device="cpu", metrics=False, row_timeout=1.0))
    row = base_row()
    slow = {**row, "row_id": "slow", "relation": None, "steps": 200, "width": 256, "height": 256}
    quick = {**row, "row_id": "quick", "relation": None}
    results = {r.row_id: r for r in worker.process([slow, quick])}
    assert results["quick"].status == "ok"
    assert results["slow"].status == "error" and "--row-timeout" in results["slow"].error
    assert "over the time limit of 1 s per row" in results["slow"].error


@pytest.mark.slow
@pytest.mark.ray
def test_a_row_that_kills_its_actor_becomes_a_poison_row_and_the_job_goes_on(ray_local, tmp_path):
    from batch.job import JobConfig, submit
    from batch.worker import WorkerConfig
    from manifests.ledger import ledger_records

    rows, _ = read_manifest(str(EXAMPLE))
    small = [r.model_copy(update={"width": 64, "height": 64, "steps": 2, "row_id": f"p-{i}"})
             for i, r in enumerate(rows[:6])]
    manifest = tmp_path / "m.parquet"
    write_manifest(small, str(manifest))
    out = tmp_path / "out"
    worker = WorkerConfig(output=str(out), metrics=False, crash_on_rows=("p-2",))
    summary = submit(JobConfig(manifest=str(manifest), output=str(out), loras=str(LORAS), actors=1, batch_size=3,
                               worker=worker))
    results = {r["row_id"]: r for r in ledger_records(str(out))}
    assert results["p-2"]["status"] == "error"
    assert results["p-2"]["error"] == "poison row: killed its actor 2 times"
    assert all(results[f"p-{i}"]["status"] == "ok" for i in (0, 1, 3, 4, 5))
    assert summary["run"]["rows"] == {"read": 6, "ok": 5, "error": 1, "rejected": 0, "pending": 0}
    assert not list((out / "attempts" / "0001" / "inflight").glob("*.json"))  # every marker cleared


def test_broken_public_format_samples_are_skipped_with_reasons_and_no_pickle_runs(tmp_path, monkeypatch):
    """The authors' public format holds .pth keypoint files: read with weights_only, a malicious pickle in one is
    a skipped sample with its reason, never executed; the good samples import."""
    from test_data import make_public_folder, make_sample

    from dreamrelation.train.data import import_public_folder

    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    prompts = {str(i): {"prompt": f"A dog hugs a cat {i}.", "entities": ["dog", "cat"]} for i in range(3)}
    root = make_public_folder(tmp_path / "public", prompts)
    for sid in "012":
        make_sample(root, sid)
    (root / "videos/1/motion_keyposes.pth").write_bytes(pickle.dumps(_Payload()))
    (root / "videos/2/concept0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records, problems = import_public_folder(str(root), "hugging")
    assert [r["triplet_id"] for r in records] == ["hugging-0"]
    reasons = {p["sample"]: p["reason"] for p in problems}
    assert "unreadable keypoint file" in reasons["1"] and "unreadable image" in reasons["2"]
    assert not marker.exists()
