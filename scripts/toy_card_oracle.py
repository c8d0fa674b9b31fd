"""Measure the shipped toy preset again with the oracle and write the figures into its card
(``dreamrelation/toy/weights/card.json``, entry ``oracle``): for when the oracle changes, not the weights.

    python scripts/toy_card_oracle.py            # 64 cases per measurement, as `models train-toy` does
"""

from __future__ import annotations

import json
import sys
import time

from dreamrelation.model.preset_names import TOY_MODEL_DIR
from dreamrelation.model.presets import load_pipeline
from dreamrelation.train.toy_model import CARD, oracle_figures


def main(cases: int | None = None) -> None:
    path = TOY_MODEL_DIR / CARD
    card = json.loads(path.read_text())
    cases = cases or card["settings"]["eval_cases"]
    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    t = time.perf_counter()
    card["oracle"] = oracle_figures(pipe, card["data"]["held_out"], cases)
    path.write_text(json.dumps(card, indent=2) + "\n")
    for name, m in card["oracle"].items():
        print(f"{name}: identity {m['identity']['rate']:.1%}, shape + colour {m['shape_colour']['rate']:.1%}, "
              f"relation {m['relation']['rate']:.1%} ({m['cases']} cases)")
    print(f"{time.perf_counter() - t:.0f} s; written to {path}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else None)
