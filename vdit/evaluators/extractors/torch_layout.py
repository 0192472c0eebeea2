"""Flax variables ⇄ PyTorch state dicts, for networks whose flax module names mirror the torch
attribute names (`Mixed_5b/branch1x1/conv/kernel` ⇄ `Mixed_5b.branch1x1.conv.weight`).

Leaves map one to one:

  params/…/kernel      [*S, I, O] (HWIO, DHWIO)  ⇄  ….weight  [O, I, *S] (OIHW, OIDHW)
  params/…/bias                                 ⇄  ….bias
  params/…/scale       (BatchNorm γ)            ⇄  ….weight
  batch_stats/…/mean                            ⇄  ….running_mean
  batch_stats/…/var                             ⇄  ….running_var

The BatchNorm ε is not stored in a state dict; each network sets its own (both use 1e-3).
`import_variables` checks the file against the network: every expected key present with the
expected torch shape, and no key left over except torch bookkeeping (`num_batches_tracked`)
and the network's documented `ignore` prefixes. Failures raise `WeightsError` naming the file,
the key and the shapes. `export_arrays` is its inverse (the tests write files with it);
`expected_shapes` lists what a file must hold (`python -m vdit.evaluators.extractors.check`).
"""

import os
from collections.abc import Mapping, Sequence

import numpy as np

from vdit.models import convert

Arrays = dict[str, np.ndarray]
_TORCH_LEAF = {
  ("params", "kernel"): "weight",
  ("params", "bias"): "bias",
  ("params", "scale"): "weight",
  ("batch_stats", "mean"): "running_mean",
  ("batch_stats", "var"): "running_var",
}
_BOOKKEEPING = (".num_batches_tracked",)  # torch BatchNorm counters: not weights
EXTENSIONS = (".npz", ".safetensors")


class WeightsError(ValueError):
  """A weights file that does not fit the network (missing, extra or misshapen arrays)."""


def torch_key(collection: str, path: Sequence[str]) -> str:
  """('params', ('Mixed_5b', 'branch1x1', 'conv', 'kernel')) -> 'Mixed_5b.branch1x1.conv.weight'."""
  return ".".join((*path[:-1], _TORCH_LEAF[(collection, path[-1])]))


def to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
  """A flax array in torch layout: kernels [*S, I, O] -> [O, I, *S]; the rest as is."""
  value = np.asarray(value, np.float32)
  if leaf != "kernel":
    return value
  n = value.ndim
  return np.ascontiguousarray(value.transpose(n - 1, n - 2, *range(n - 2)))


def from_torch(leaf: str, value: np.ndarray) -> np.ndarray:
  """Inverse of `to_torch`: kernels [O, I, *S] -> [*S, I, O]."""
  value = np.asarray(value, np.float32)
  if leaf != "kernel":
    return value
  return np.ascontiguousarray(value.transpose(*range(2, value.ndim), 1, 0))


def _torch_shape(leaf: str, shape: Sequence[int]) -> tuple[int, ...]:
  shape = tuple(int(s) for s in shape)
  return (shape[-1], shape[-2], *shape[:-2]) if leaf == "kernel" else shape


def _flat(tree: Mapping, prefix: tuple[str, ...] = ()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flat(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def expected_shapes(template: Mapping) -> dict[str, tuple[int, ...]]:
  """torch key -> torch shape that a file must hold for a network with these variables."""
  return {
    torch_key(c, path): _torch_shape(path[-1], leaf.shape)
    for c, sub in template.items()
    for path, leaf in _flat(sub)
  }


def export_arrays(variables: Mapping) -> Arrays:
  """Flax variables {"params", "batch_stats"} -> a state dict in torch names and layouts."""
  return {
    torch_key(c, path): to_torch(path[-1], value)
    for c, sub in variables.items()
    for path, value in _flat(sub)
  }


def import_variables(
  arrays: Mapping[str, np.ndarray],
  template: Mapping,
  *,
  source: str,
  net: str,
  ignore: Sequence[str] = (),
) -> dict:
  """A torch-named state dict -> flax variables with the structure and shapes of `template`.

  `template`: the network's variables or their `jax.eval_shape`; `source`: the file (for
  errors); `ignore`: key prefixes that may be present and are not used (e.g. a classifier head).
  """
  arrays = dict(arrays)
  if arrays and all(k.startswith("module.") for k in arrays):  # saved from nn.DataParallel
    arrays = {k.removeprefix("module."): v for k, v in arrays.items()}
  out: dict = {}
  missing = []
  for collection in sorted(template, key=lambda c: c != "params"):  # weights first
    for path, leaf in _flat(template[collection]):
      key = torch_key(collection, path)
      want = _torch_shape(path[-1], leaf.shape)
      if key not in arrays:
        missing.append(f"{key!r} {want}")
        continue
      found = tuple(np.shape(arrays[key]))
      if found != want:
        raise WeightsError(
          f"{source}: {key!r} has shape {found}, the {net} network expects {want} "
          f"(torch layout: conv weights [out, in, *kernel])"
        )
      node = out.setdefault(collection, {})
      for part in path[:-1]:
        node = node.setdefault(part, {})
      node[path[-1]] = from_torch(path[-1], arrays.pop(key))
  if missing:
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    raise WeightsError(
      f"{source}: missing {', '.join(missing[:3])}{more} (the {net} network's keys in the "
      "naming of docs/evaluation.md)"
    )
  extra = sorted(
    k for k in arrays if not k.endswith(_BOOKKEEPING) and not k.startswith(tuple(ignore))
  )
  if extra:
    raise WeightsError(
      f"{source}: {len(extra)} keys the {net} network does not use: {extra[:5]}"
      f"{' …' if len(extra) > 5 else ''} (a different model or naming?)"
    )
  return out


def read(path: str) -> Arrays:
  """name -> array of a `.npz` or `.safetensors` file (numpy only; no torch)."""
  if not path.endswith(EXTENSIONS):
    raise WeightsError(f"weights={path!r}: expected a {' or '.join(EXTENSIONS)} file")
  if not os.path.exists(path):
    raise FileNotFoundError(f"weights={path!r} does not exist")
  if path.endswith(".npz"):
    return convert.load_npz(path)
  return convert.load_safetensors(path)


def write(arrays: Mapping[str, np.ndarray], path: str) -> str:
  """Writes a state dict as `.npz` or `.safetensors` (by extension); returns `path`."""
  arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}
  if path.endswith(".npz"):
    np.savez(path, **arrays)
  elif path.endswith(".safetensors"):
    from safetensors.numpy import save_file  # noqa: PLC0415  (optional dependency)

    save_file(arrays, path)
  else:
    raise WeightsError(f"{path!r}: expected a {' or '.join(EXTENSIONS)} file name")
  return path
