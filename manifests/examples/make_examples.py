"""Write the example manifest used by the quickstart and the tests (deterministic), in three formats.

    python manifests/examples/make_examples.py [OUT_DIR]     # default: manifests/examples

- ``example.parquet``: the manifest for ``dreamrelation batch submit``;
- ``example.jsonl`` and ``example.csv``: the same rows as input for ``dreamrelation manifest build``.

18 rows over 3 relations (``hugging``, ``shaking_hands``, ``riding``) plus rows with no relation, 1-3 subjects each,
128x128, 4 steps: sized for the tiny preset on a CPU. Subject images are named relative to the manifest's folder
(``subjects/dog.png``); readers resolve them against that folder, so the folder can be copied anywhere, a bucket
included. The subject images themselves are made by ``make_subjects.py`` (run first if they are missing).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(HERE.parents[1]))

from manifests.io import write_manifest  # noqa: E402
from manifests.schema import GenerationRow  # noqa: E402

MAX_SUBJECTS = 3
SIZE = 128
STEPS = 4

# relation -> (prompt template, relation phrase, boxes per subject)
RELATIONS = {
    "hugging": ("A {} is hugging a {} in front of the mountain.", "hugging",
                [[0.14, 0.15, 0.56, 0.92], [0.44, 0.15, 0.86, 0.92]]),
    "shaking_hands": ("A {} shakes hands with a {} in the forest.", "shakes hands with",
                      [[0.06, 0.18, 0.5, 0.92], [0.5, 0.18, 0.94, 0.92]]),
    # the rider above, the one ridden below
    "riding": ("A {} is riding a {} along a country road.", "riding",
               [[0.3, 0.05, 0.7, 0.5], [0.15, 0.4, 0.85, 0.95]]),
}

PAIRS = {
    "hugging": [("dog", "cat"), ("plushie_bear", "robot"), ("cat", "plushie_bear"), ("robot", "teapot"),
                ("dog", "plushie_bear")],
    "shaking_hands": [("robot", "dog"), ("cat", "teapot"), ("plushie_bear", "dog"), ("robot", "cat"),
                      ("teapot", "plushie_bear")],
    "riding": [("cat", "dog"), ("plushie_bear", "robot"), ("teapot", "dog"), ("robot", "plushie_bear")],
}

# no relation LoRA: plain multi-subject customization (the relation phrase is left to the worker)
FREE = [
    ("A {} on a wooden table.", ["teapot"], [[0.25, 0.3, 0.75, 0.85]]),
    ("A {}, a {} and a {} sitting on a sofa.", ["dog", "cat", "robot"],
     [[0.02, 0.3, 0.34, 0.9], [0.34, 0.3, 0.66, 0.9], [0.66, 0.3, 0.98, 0.9]]),
    ("A {} next to a {} in a garden.", ["plushie_bear", "teapot"], [[0.08, 0.25, 0.5, 0.9], [0.55, 0.45, 0.9, 0.9]]),
    ("A {}, a {} and a {} at a picnic.", ["cat", "plushie_bear", "teapot"],
     [[0.02, 0.25, 0.36, 0.9], [0.34, 0.2, 0.68, 0.9], [0.68, 0.5, 0.98, 0.9]]),
]


def _words(name: str) -> str:
    return name.replace("_", " ")


def _subjects(names: list[str], boxes: list[list[float]]) -> list[dict]:
    return [{"image": f"subjects/{name}.png", "phrase": _words(name), "box": box} for name, box in zip(names, boxes)]


def example_rows() -> list[GenerationRow]:
    """The example rows (subject images relative to the manifest's folder)."""
    specs = []
    for relation, pairs in PAIRS.items():
        text, phrase, boxes = RELATIONS[relation]
        specs += [(relation, phrase, text, list(pair), boxes) for pair in pairs]
    specs += [(None, None, text, names, boxes) for text, names, boxes in FREE]
    rows = []
    for i, (relation, phrase, text, names, boxes) in enumerate(specs):
        rows.append(GenerationRow(
            row_id=f"ex-{i:02d}-{relation or 'none'}",
            prompt=text.format(*map(_words, names)),
            relation=relation,
            relation_phrase=phrase,
            subjects=_subjects(names, boxes),
            seed=1000 + i,
            num_images=2 if i % 3 == 0 else 1,
            steps=STEPS,
            width=SIZE,
            height=SIZE,
            metadata={"campaign": "example", "pair": "+".join(names)},
        ))
    return rows


def _csv_rows(rows: list[GenerationRow]) -> tuple[list[str], list[dict[str, str]]]:
    """Flat CSV form: one column per scalar field, ``subjectN_image/phrase/box`` and JSON ``metadata``."""
    scalar = ["row_id", "prompt", "relation", "relation_phrase", "seed", "num_images", "steps", "guidance", "scale",
              "width", "height"]
    header = scalar + [f"subject{k}_{key}" for k in range(1, MAX_SUBJECTS + 1) for key in ("image", "phrase", "box")]
    header.append("metadata")
    out = []
    for row in rows:
        cells = {name: "" if getattr(row, name) is None else str(getattr(row, name)) for name in scalar}
        for k, subject in enumerate(row.subjects, start=1):
            cells[f"subject{k}_image"] = subject.image
            cells[f"subject{k}_phrase"] = subject.phrase
            cells[f"subject{k}_box"] = ",".join(repr(v) for v in subject.box)
        cells["metadata"] = json.dumps(row.metadata, sort_keys=True)
        out.append(cells)
    return header, out


def main(out: Path = HERE) -> list[Path]:
    if not (HERE / "subjects").is_dir():
        from manifests.examples import make_subjects

        make_subjects.main(HERE / "subjects")
    out.mkdir(parents=True, exist_ok=True)
    rows = example_rows()
    paths = [out / "example.parquet", out / "example.jsonl", out / "example.csv"]
    write_manifest(rows, str(paths[0]))
    with open(paths[1], "w", encoding="utf-8") as f:
        for row in rows:  # defaults left out, as a person would write it
            f.write(json.dumps(row.model_dump(exclude_defaults=True), sort_keys=True) + "\n")
    header, cells = _csv_rows(rows)
    with open(paths[2], "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(cells)
    return paths


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for p in main(target):
        print(p)
