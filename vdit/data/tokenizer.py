"""A built-in, offline word-level tokenizer for captions.

Text is lowercased and split on non-alphanumerics. Ids: PAD=0, BOS=1, NULL=2, then a fixed word
list (colours, shapes, motions, digits, common English words) with stable ids, then hashed buckets
(zlib.crc32, stable across processes and machines) for every other word. The empty caption
encodes to [NULL], the null condition for classifier-free guidance.

`_WORDS` is append-only: reordering or removing a word changes the ids of trained models.
"""

import logging
import re
import zlib

import numpy as np

PAD_ID = 0
BOS_ID = 1
NULL_ID = 2
_SPECIALS = ("<pad>", "<bos>", "<null>")

_WORDS = """
red green blue yellow orange purple pink brown black white gray grey cyan magenta violet gold
silver dark light bright pale colour color coloured colored
circle square triangle diamond star rectangle ellipse oval hexagon pentagon heart cross ring dot
disk disc ball box cube sphere line shape shapes object objects blob
moving move moves moved left right up down upward upwards downward downwards leftward rightward
forward backward diagonal diagonally static still standing stationary fast slow slowly quickly
across toward towards away around rotating spinning bouncing falling rising sliding drifting
turning growing shrinking zooming panning pan zoom camera motion direction
0 1 2 3 4 5 6 7 8 9
zero one two three four five six seven eight nine ten digit digits number numbers handwritten
a an the and or of on in at to from with without into onto over under above below behind
between near far is are was were be being been it its this that these those there here which
who what where when while background foreground scene video image photo picture frame frames
clip plain gradient textured texture top bottom middle center centre corner edge side small
large big tiny huge little medium size very slightly some many few each other another then
next first last together alone single pair group both
man woman person people child dog cat bird horse fish car bus train boat plane tree flower
house building water sky sun moon cloud clouds grass road street city field forest mountain
river sea ocean beach snow rain shadow day night morning evening
walking running flying jumping swimming sitting playing looking holding talking eating riding
driving dancing lying floating rolling waving
close closeup view aerial wide shot timelapse sunny cloudy
old new young beautiful colorful colourful empty full round flat tall short long
by for as not no yes all only also just through beside inside outside against along
their his her our your my we you he she they i
rock stone wood wooden metal glass paper sand leaf leaves wall floor table window door
room lights fire smoke wave waves
""".split()
_WORD_IDS = {w: i + len(_SPECIALS) for i, w in enumerate(_WORDS)}
if len(_WORD_IDS) != len(_WORDS):
  raise ValueError("tokenizer word list has duplicates; each word must appear once")
NUM_FIXED_IDS = len(_SPECIALS) + len(_WORD_IDS)

_SPLIT = re.compile(r"[^0-9a-z]+")


def words(text: str) -> list[str]:
  """Lowercased alphanumeric words of `text`."""
  return [w for w in _SPLIT.split(text.lower()) if w]


class Tokenizer:
  """Word-level tokenizer with a fixed vocabulary and hashed buckets for unknown words."""

  def __init__(self, vocab_size: int = 1024):
    if vocab_size <= NUM_FIXED_IDS:
      raise ValueError(
        f"vocab_size={vocab_size} leaves no hash buckets; expected > {NUM_FIXED_IDS} "
        "(specials + built-in words)"
      )
    self.vocab_size = vocab_size
    self._warned_truncation = False

  def word_id(self, word: str) -> int:
    """Id of one lowercased word: built-in id, or a crc32 hash bucket past the built-in ids."""
    known = _WORD_IDS.get(word)
    if known is not None:
      return known
    buckets = self.vocab_size - NUM_FIXED_IDS
    return NUM_FIXED_IDS + zlib.crc32(word.encode("utf-8")) % buckets

  def encode(self, text: str | bytes, max_len: int | None = None) -> np.ndarray:
    """[BOS, w1, w2, ...] as int32, truncated to `max_len`; the empty caption is [NULL]."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    if max_len is not None and max_len < 1:
      raise ValueError(f"max_len={max_len} must be >= 1")
    tokens = words(text)
    if not tokens:
      return np.array([NULL_ID], np.int32)
    ids = [BOS_ID] + [self.word_id(w) for w in tokens]
    if max_len is not None and len(ids) > max_len:
      if not self._warned_truncation:
        logging.warning(
          "caption of %d tokens truncated to max_len=%d (warned once): %r", len(ids), max_len, text
        )
        self._warned_truncation = True
      ids = ids[:max_len]
    return np.array(ids, np.int32)

  def decode(self, ids) -> str:
    """Readable text for debugging; hashed words show as `<hash:ID>`, PAD is dropped."""
    inverse = {i: w for w, i in _WORD_IDS.items()}
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == PAD_ID:
        continue
      out.append(_SPECIALS[i] if i < len(_SPECIALS) else inverse.get(i, f"<hash:{i}>"))
    return " ".join(out)


def fingerprint(vocab_size: int) -> str:
  """Identifies the ids this tokenizer gives at `vocab_size` ("words<crc32>-v<size>"): a run that
  turns ids back into words (a captioner) records it and refuses to load under another."""
  return f"words{zlib.crc32(' '.join(_SPECIALS + tuple(_WORDS)).encode()):08x}-v{vocab_size}"


def decode_words(ids, vocab_size: int) -> str:
  """The caption ids spell: built-in words only (hashed ones have no inverse and are left
  out), up to the first PAD; BOS and NULL are not words."""
  inverse = {i: w for w, i in _WORD_IDS.items()}
  out = []
  for i in np.asarray(ids).reshape(-1).tolist():
    if i == PAD_ID:
      break
    if i in inverse and i < vocab_size:
      out.append(inverse[i])
  return " ".join(out)
