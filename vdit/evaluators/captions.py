"""`captions`: decode the validation split and score what each caption says, attribute by attribute.

Every example of the split once (the task's `batches`), decoded by the task's `captions`
function (greedy; with `beams` > 1 beam search too). Both the true and the decoded caption are
read by `caption_attributes.parse` (colour, object — a shape or a digit —, direction, speed,
background), and the adherence scorer's own parser (`shapes_scorer.parse_caption`) checks the
canonical object phrase "a {colour} {shape} moving {direction}".

Captioner (`caption.source="video"`), per decoding (`greedy_*`, `beam_*`):
  <attribute>   accuracy over the examples whose true caption names it (speed: all examples;
                no speed word = the normal speed, and saying none is then right)
  phrase        the decoded caption parses to the true first object (`shapes` only)
  exact         the decoded words equal the true ones (hashed words are left out of both)
  (`<x>_background` counts the captions that name the background unprompted: the dataset names
  it in a random quarter of its captions, which no video shows, so a greedy decoder rarely does.)
asked_background: the background asked for, over the true captions that name it: each caption
  is given up to "... on a" (`background_prefix`) and decoded greedily from there.

Prompt expansion (`caption.source="prompt"`; the prompts are the true captions with attributes
dropped, as in training, with the eval's fixed seed), sampled at `temperature`:
  kept          of the attributes a prompt names, the fraction the expansion keeps
  filled        of colour / object / direction absent from a prompt, the fraction the expansion
                names with a valid word; `filled_<attribute>_<word>`: how often it filled the
                attribute with that word (None: not at all), a distribution per attribute
  phrase        the expansion has a canonical object phrase (`shapes` only)
"""

import collections

import jax
import numpy as np

from vdit.data import caption_attributes, tokenizer
from vdit.evaluators import Context, NotApplicable, predict_fn, shapes_scorer
from vdit.tasks import captioning

FILLED = ("colour", "object", "direction")  # attributes every caption names


def evaluate(ctx: Context, beams: int = 4, temperature: float = 1.0, examples: int = 0) -> dict:
  """`examples` > 0 stops after that many (0: the whole split)."""
  config, fns, params, workdir, step = ctx
  captions_fn, batches = predict_fn(fns, "captions"), predict_fn(fns, "batches")
  if config.get("task") != "captioning":
    raise NotApplicable(f"task={config.get('task')!r} decodes no captions")
  source = config.caption.source
  vocab, slots = config.input.vocab_size, config.input.max_examples_per_row
  shapes_data = config.input.dataset == "shapes" and not config.input.get("mixture")
  decodings = {"greedy": 1} if source == "prompt" else {"greedy": 1, "beam": beams}
  if beams <= 1:
    decodings.pop("beam", None)
  pairs = collections.defaultdict(list)  # decoding -> [(truth, decoded, prompt)]
  asked = []  # (truth, decoded given "... on a")
  for i, batch in enumerate(batches()):
    rng = jax.random.PRNGKey(i)
    truths = captioning.packed_texts(batch["text_tokens"], batch["text_segment_ids"], slots, vocab)
    valid = np.asarray(batch["shapes"])[..., 0] > 0  # [B, K]
    if source == "video":  # the background, asked for: each caption continued from "... on a"
      prefix, named = background_prefix(batch, slots, config.input.max_caption_tokens, vocab)
      out = captions_fn(params, batch, rng, beams=1, prefix=prefix)
      decoded = np.asarray(out["captions"])
      for b, k in zip(*np.nonzero(named)):
        text = captioning.caption_texts(decoded[b, k], vocab)[0]
        asked.append((truths[b][k], text))
    for name, width in decodings.items():
      out = captions_fn(
        params, batch, rng, beams=width, temperature=temperature * (source == "prompt")
      )
      decoded = np.asarray(out["captions"])
      prompts = captioning.packed_texts(out["prompts"], out["prompt_segment_ids"], slots, vocab)
      for b, k in zip(*np.nonzero(valid)):
        text = captioning.caption_texts(decoded[b, k], vocab)[0]
        pairs[name].append((truths[b][k], text, prompts[b][k]))
    if examples and len(pairs["greedy"]) >= examples:
      break
  results = {}
  for name, items in pairs.items():
    items = items[: examples or None]
    if source == "prompt":
      results |= expansion_scores(items, shapes_data)
    else:
      results |= {f"{name}_{k}": v for k, v in caption_scores(items, shapes_data).items()}
    results["examples"] = len(items)
  if asked:
    results["asked_background"] = sum(
      caption_attributes.parse(t)["background"] == caption_attributes.parse(d)["background"]
      for t, d in asked
    ) / len(asked)
    results["asked_examples"] = len(asked)
  if jax.process_index() == 0:
    shown = {k: round(v, 3) for k, v in results.items() if not k.startswith("filled_")}
    print(f"captions at step {step}: {shown} -> {workdir}/eval/{step}.json", flush=True)
    for truth, text, prompt in pairs["greedy"][:4]:
      given = f"prompt {prompt!r} -> " if source == "prompt" else ""
      print(f"  true {truth!r}; {given}decoded {text!r}", flush=True)
  return results


def background_prefix(batch, slots: int, length: int, vocab: int):
  """((tokens [B, K, N], lengths [B, K]), named [B, K]): each true caption that names its
  background cut after "on a" (BOS first), the others after BOS; named: which do."""
  on = tokenizer.Tokenizer(vocab).word_id("on")
  tokens, seg = np.asarray(batch["text_tokens"]), np.asarray(batch["text_segment_ids"])
  b = tokens.shape[0]
  prefix = np.full((b, slots, length), tokenizer.PAD_ID, np.int32)
  prefix[..., 0] = tokenizer.BOS_ID
  lengths = np.ones((b, slots), np.int32)
  for row in range(b):
    for k in range(slots):
      caption = tokens[row][seg[row] == k + 1]
      at = np.nonzero(caption == on)[0]
      if at.size and at[0] + 2 <= length and caption[0] == tokenizer.BOS_ID:
        n = at[0] + 2  # through "on a"
        prefix[row, k, :n], lengths[row, k] = caption[:n], n
  return (prefix, lengths), lengths > 1


def caption_scores(items, shapes_data: bool) -> dict[str, float]:
  """Per-attribute accuracy of decoded captions against the true ones (see the module doc)."""
  right, count = collections.Counter(), collections.Counter()
  for truth, text, _ in items:
    want, got = caption_attributes.parse(truth), caption_attributes.parse(text)
    for key in caption_attributes.ATTRIBUTES:
      if want[key] is not None or key == "speed":
        count[key] += 1
        right[key] += want[key] == got[key]
    count["exact"] += 1
    right["exact"] += truth == text
    if shapes_data:
      count["phrase"] += 1
      right["phrase"] += _object(truth) is not None and _object(truth) == _object(text)
  return {k: right[k] / count[k] for k in count}


def expansion_scores(items, shapes_data: bool) -> dict[str, float]:
  """Kept / filled rates and the distribution of filled words (see the module doc)."""
  right, count, filled = collections.Counter(), collections.Counter(), collections.Counter()
  for _, text, prompt in items:
    given, got = caption_attributes.parse(prompt), caption_attributes.parse(text)
    for key in caption_attributes.ATTRIBUTES:
      if given[key] is not None:
        count["kept"] += 1
        right["kept"] += given[key] == got[key]
      elif key in FILLED:
        count["filled"] += 1
        right["filled"] += got[key] is not None
        filled[(key, got[key])] += 1
    if shapes_data:
      count["phrase"] += 1
      right["phrase"] += _object(text) is not None
  scores = {k: right[k] / count[k] for k in count}
  per_key = collections.Counter()
  for (key, _), n in filled.items():
    per_key[key] += n
  return scores | {
    f"filled_{k}_{w}": n / per_key[k] for (k, w), n in sorted(filled.items(), key=str)
  }


def _object(text: str):
  try:
    return shapes_scorer.parse_caption(caption_attributes.normalise(text))[0]
  except ValueError:
    return None
