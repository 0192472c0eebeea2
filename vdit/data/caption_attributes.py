"""What a caption of the bundled datasets says, attribute by attribute, and which words say it.

`parse(text)` reads the attributes out of a caption or a partial prompt, tolerantly (any word
order, missing attributes are None): the scoring of the captioner and of prompt expansion.
`word_kinds(vocab_size)` gives every token id the kind of attribute it names, the table prompt
expansion drops attributes by (`vdit.tasks.captioning.drop_attributes`).

Captions are compared after a round trip through the word-level tokenizer, which splits
"up-left" into "up left": `parse` reads both.
"""

import re

import numpy as np

from vdit.data import tokenizer
from vdit.datasets import moving_digits, shapes

ATTRIBUTES = ("colour", "object", "direction", "speed", "background")
COLOURS = tuple(dict.fromkeys((*shapes.COLOUR_NAMES, *moving_digits.INKS)))
OBJECTS = shapes.SHAPES
DIGITS = {str(d): str(d) for d in range(10)} | {
  w: str(d) for d, w in enumerate(moving_digits.NUMBER_WORDS)
}
DIRECTIONS = shapes.DIRECTION_NAMES
SPEEDS = ("slowly", "quickly")
BACKGROUNDS = tuple(dict.fromkeys((*shapes.BACKGROUND_NAMES, *moving_digits.PAPERS)))

# Kinds of words (`word_kinds`). Phrases are marked by their first word and run to the end of
# the caption (shapes: "... on a gray background"; moving_digits: "... in red"), or end at it
# (a lead-in "a video of").
FUNCTION, COLOUR, OBJECT, MOTION, SPEED = range(5)
ON, IN, OF = 5, 6, 7  # "on" starts the background phrase, "in" a colour phrase; "of" ends a lead-in
NUM_KINDS = 8

_BACKGROUND = re.compile(r"\bon an? (\w+) background\b")
_DIAGONAL = re.compile(r"\b(up|down)[ -](left|right)\b")
_MOVING = re.compile(r"\bmoving ([\w-]+)")


def normalise(text: str) -> str:
  """Lowercase, with "up left" (as the tokenizer splits "up-left") joined again."""
  return _DIAGONAL.sub(r"\1-\2", text.lower())


def parse(text: str) -> dict[str, str | None]:
  """{attribute: word or None} of a caption or prompt: colour, object (a shape or a digit
  "0".."9"), direction ("bouncing" for "bouncing around"), speed ("slowly" / "quickly"; None:
  the normal speed, which captions do not name) and background."""
  text = normalise(text)
  found = _BACKGROUND.search(text)
  background = found.group(1) if found else None
  rest = _BACKGROUND.sub(" ", text)
  words = re.findall(r"[\w-]+", rest)
  first = lambda options: next((w for w in words if w in options), None)  # noqa: E731
  moving = _MOVING.search(rest)
  direction = moving.group(1) if moving and moving.group(1) in DIRECTIONS else None
  if direction is None and "bouncing" in words:
    direction = "bouncing"
  digit = first(DIGITS)
  return dict(
    colour=first(COLOURS),
    object=first(OBJECTS) or (DIGITS[digit] if digit else None),
    direction=direction,
    speed=first(SPEEDS),
    background=background if background in BACKGROUNDS else None,
  )


def word_kinds(vocab_size: int) -> np.ndarray:
  """[V] int32: the kind of attribute every token id names (FUNCTION for the rest)."""
  tok = tokenizer.Tokenizer(vocab_size)
  kinds = np.full(vocab_size, FUNCTION, np.int32)
  groups = {
    COLOUR: COLOURS + BACKGROUNDS,
    OBJECT: (*OBJECTS, *DIGITS),
    MOTION: ("moving", "bouncing", "around", "up", "down", "left", "right"),
    SPEED: SPEEDS,
    ON: ("on",),
    IN: ("in",),
    OF: ("of",),
  }
  for kind, names in groups.items():
    for name in names:
      kinds[tok.word_id(name)] = kind
  return kinds
