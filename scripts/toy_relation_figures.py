"""Why the paper in miniature stays flat: the toy preset's oracle figures per relation (caption + subject images +
boxes, no LoRA), and the held-out relation's scenes drawn from another caption (the same subjects, portraits and
boxes, the words of a relation the model was trained on). If the held-out scenes stay unrecognisable under a
trained caption, it is their layout the model cannot draw, not the unseen words, and a relation LoRA on 5
triplets has little to work with.

    python scripts/toy_relation_figures.py            # 64 cases per line (about 3 minutes on 2 cores)
"""

from __future__ import annotations

import json
import sys
import time

from dreamrelation.model.preset_names import TOY_MODEL_DIR
from dreamrelation.model.presets import load_pipeline
from dreamrelation.toy import oracle, world
from dreamrelation.train.toy_model import CARD, TOY_SIZE, measure

SEED = 2  # the held-out cases' seed in `eval toy-paper` (its seed 0 + 2)


def _line(name: str, rates: dict) -> str:
    def pct(key: str) -> str:
        lo, hi = rates[key]["ci95"]
        return f"{rates[key]['rate']:.1%} [{lo:.1%}, {hi:.1%}]"

    return (f"{name:<34} shape + colour {pct('shape_colour')}, relation {pct('relation')}, "
            f"identity {pct('identity')} ({rates['cases']} cases)")


def reworded(pipe, held_out: str, trained: str, cases: int) -> dict:
    """The oracle's rates on ``cases`` scenes of ``held_out`` (``measure``'s scenes of seed :data:`SEED`) drawn from
    the caption of ``trained`` (same arity) with the same subjects, portraits and boxes."""
    words = world.relation(trained)
    scenes = [world.random_scene(SEED * 7919 + i, TOY_SIZE, [held_out]) for i in range(cases)]
    verdicts = []
    for start in range(0, cases, 32):
        chunk = scenes[start:start + 32]
        images = pipe([words.text.format(*[i.phrase for i in s.identities]) for s in chunk],
                      [[world.portrait(i, TOY_SIZE)[0] for i in s.identities] for s in chunk],
                      [[i.phrase for i in s.identities] for s in chunk], [s.boxes.tolist() for s in chunk],
                      seed=[SEED * 7919 + start + j for j in range(len(chunk))], num_inference_steps=25,
                      guidance_scale=5.0, height=TOY_SIZE, width=TOY_SIZE, progress=False).images
        verdicts += [oracle.judge(im, s.identities, s.layout.relation) for im, s in zip(images, chunk)]
    return oracle.rates(verdicts)


def main(cases: int = 64) -> None:
    held_out = json.loads((TOY_MODEL_DIR / CARD).read_text())["data"]["held_out"]
    arity = world.relation(held_out).arity
    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    t = time.perf_counter()
    for r in world.RELATIONS:
        tag = " (held out)" if r.id == held_out else ""
        print(_line(r.id + tag, measure(pipe, [r.id], cases, seed=SEED, adapter=True)), flush=True)
    for r in world.RELATIONS:
        if r.arity == arity and r.id != held_out:
            print(_line(f"{held_out} in {r.id}'s words", reworded(pipe, held_out, r.id, cases)), flush=True)
    print(f"{time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
