"""`python scripts/toy_samples.py docs/toy-samples.png`: for 8 cases of relations the toy preset was trained on,
the world's render, the model from the caption alone, and the model with subject images and boxes (the adapter),
side by side, 3x enlarged."""
import sys
from PIL import Image
from dreamrelation.model.presets import load_pipeline
from dreamrelation.toy import world
from dreamrelation.train.toy_model import training_relations
pipe = load_pipeline("toy"); pipe.set_progress_bar_config(disable=True)
rels = training_relations("on_top_of")
scenes = [world.scene(r, 100 + i) for i, r in enumerate(rels)]
base = pipe.text_to_image([s.caption for s in scenes], [7] * len(scenes), height=64, width=64, steps=25, guidance=5.0)
ada = []
for s in scenes:
    ada += pipe(s.caption, [world.portrait(i)[0] for i in s.identities], [i.phrase for i in s.identities],
                s.boxes.tolist(), seed=7, num_inference_steps=25, guidance_scale=5.0, height=64, width=64, progress=False).images
z = 3
grid = Image.new("RGB", (64 * z * len(scenes), 64 * z * 3), "white")
for c, (s, b, a) in enumerate(zip(scenes, base, ada)):
    for r, im in enumerate((s.image, b, a)):
        grid.paste(im.resize((64 * z, 64 * z), Image.NEAREST), (64 * z * c, 64 * z * r))
grid.save(sys.argv[1])
for s in scenes: print(s.caption)
