r"""Video captioner: a packed native-size video encoder and a small caption decoder.

  python -m vdit.main --config=configs/caption/video.py:tiny --workdir=runs/captioner
  ... :tiny,dataset=moving_digits      (the digits' captions: "a handwritten 7 moving up-left")

The clips of `shapes` (or `moving_digits`) are read at their native size and aspect ratio,
packed into rows (`vdit.data.pipeline`), encoded by a ViT over spacetime patches with attention
kept inside each example (NaViT / ViViT Model 1) and captioned by a decoder that cross-attends
to its own example's tokens (`vdit.models.captioner`). The `captions` evaluator decodes the
validation split (greedy and beam) and scores each caption's attributes by parsing it
(docs/models.md, "Captioning and prompt expansion"). `:tiny` on `shapes` (2,500 steps, ≈ 49 min
on 2 shared CPU cores): colour 100%, shape 87.5%, direction 99.5%, background asked 97.9%.
"""

import ml_collections

from vdit import config_lib
from vdit.data import tokenizer

# (width, encoder depth, decoder depth, heads): tiny for CPU, else a ViT-B-sized encoder.
SIZES = {True: (96, 4, 2, 4), False: (768, 12, 6, 12)}
VOCAB = 1024


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, tiny=False, dataset="shapes")
  tiny = arg.tiny
  width, depth, decoder_depth, heads = SIZES[tiny]
  c = config_lib.trainer_config(
    tiny=tiny,
    total_steps=2500 if tiny else 100_000,
    lr=1e-3 if tiny else 3e-4,
    warmup_steps=100 if tiny else 5_000,
    weight_decay=1e-4,
  )
  c.task = "captioning"
  c.input = dict(
    dataset=arg.dataset,
    dataset_config="tiny" if tiny else "default",
    patch_size=(2, 4, 4) if tiny else (2, 8, 8),
    max_frames=8 if tiny else 32,
    # True: the 8 frames spread over the whole clip (how far the object travels, its speed, is
    # then in them); False: a window of 8 consecutive frames (docs/models.md, "speed").
    whole_clip=False,
    tokens_per_row=512 if tiny else 4096,
    rows_per_batch=4 if tiny else 256,
    max_examples_per_row=8,
    max_tokens_per_example=256 if tiny else 1024,
    text_tokens_per_row=128,
    max_caption_tokens=16,
    vocab_size=VOCAB,
  )
  c.caption = dict(source="video", attribute_drop=0.5, tokenizer=tokenizer.fingerprint(VOCAB))
  c.model = dict(
    name="captioner",
    width=width,
    depth=depth,
    decoder_depth=decoder_depth,
    num_heads=heads,
    mlp_ratio=4.0,
    # Both lift `shapes` direction from chance to 99.5% and shape from chance to 58.5% at 1,000
    # tiny steps (docs/models.md, "Captioning and prompt expansion", the table).
    patch_context=(3, 3, 3),  # (kt, kh, kw): a convolutional patch embedding; () = none
    center_input=True,  # subtract each example's mean colour from its patches
    position_code="absolute",  # or "fractional": h, w as fractions of the canvas (speed)
    **config_lib.RUNTIME,
  )
  # Every 1,000 steps (and at the end): shape is learnt late, so its curve is what to read.
  c.evals = dict(
    captions=dict(type="captions", every_steps=1000 if tiny else 20_000, beams=4, examples=0)
  )
  return c
