r"""Checks a converted weights file against its network, or lists what the network expects.

  python -m vdit.evaluators.extractors.check --net=inception --weights=pt_inception-2015-12-05.npz
  python -m vdit.evaluators.extractors.check --net=i3d --list    # torch keys and shapes, one a line

A good file prints one JSON line (`arrays`, `params`) and exits 0; a bad one prints the loader's
error (missing key, shape, unused keys; named with the file) and exits 1.
"""

import json
import sys

from absl import app, flags

from vdit.evaluators.extractors import i3d, inception, torch_layout

NETS = {"inception": inception, "i3d": i3d}


def check(net: str, weights: str) -> dict:
  """Loads `weights` as `net` (raising `torch_layout.WeightsError` if it does not fit)."""
  variables = NETS[net].load(weights)
  params = sum(v.size for v in torch_layout.export_arrays(variables).values())
  return {
    "net": net,
    "weights": weights,
    "arrays": len(torch_layout.read(weights)),
    "values": params,
  }


def main(argv):
  del argv
  f = flags.FLAGS
  if f.list:
    for key, shape in sorted(torch_layout.expected_shapes(NETS[f.net].template()).items()):
      print(key, list(shape))
    return
  try:
    print(json.dumps(check(f.net, f.weights)))
  except (torch_layout.WeightsError, FileNotFoundError) as e:
    print(e, file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.DEFINE_enum("net", None, sorted(NETS), "network", required=True)
  flags.DEFINE_string("weights", None, "a .npz or .safetensors state dict")
  flags.DEFINE_bool("list", False, "print the expected torch keys and shapes instead")
  app.run(main)
