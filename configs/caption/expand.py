r"""Prompt expansion: the captioner's decoder conditioned on a short prompt instead of a video.

  python -m vdit.main --config=configs/caption/expand.py:tiny --workdir=runs/expander
  python -m vdit.sample --workdir=runs/shapes --expand_prompt=runs/expander \
      --prompt="red circle" --out=x.gif

Trained on the dataset's captions alone: each example's prompt is its caption with attributes
dropped at random (`caption.attribute_drop`; `vdit.tasks.captioning.drop_attributes`), the
target the full caption. Sampled with a temperature, the attributes a prompt leaves out are
drawn from what the data shows (docs/sampling.md, "Prompt expansion"). The pipeline still
packs the clips (the task's batches are the packed rows); they are read at a few tokens each
and the model never looks at them.
"""

import ml_collections

from vdit import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_lib.parse_arg(arg, tiny=False, dataset="shapes")
  tiny = arg.tiny
  c = config_lib.load_sibling(
    __file__, "video.py", ",".join([*(["tiny"] if tiny else []), f"dataset={arg.dataset}"])
  )
  c.caption.source = "prompt"
  c.total_steps = 1000 if tiny else 50_000
  c.input.update(
    patch_size=(1, 8, 8),
    max_frames=1,  # one frame, a few patches: the clips are not read by the model
    max_tokens_per_example=2,
    tokens_per_row=16,
    max_examples_per_row=8,
    rows_per_batch=8 if tiny else 256,
    text_tokens_per_row=128,
  )
  c.model.depth = 2 if tiny else 6  # the prompt's text encoder
  c.evals = dict(captions=dict(type="captions", beams=1, temperature=1.0, examples=0))
  return c
