"""Sampling on a device mesh: one video's tokens over `sequence`, its heads over `tensor`.

The sampler's rows ([2N, L, ...]: N conditional rows, then their N null rows; N rows at
guidance 1) are placed with the training layout, by the run's logical rules
(`config.sharding_rules`): rows over `data` × `fsdp`, the tokens of a row over `sequence`, and
the params as in training (`embed` over `fsdp`, heads and MLP units over `tensor`). The loop
(`objectives.sample_rows`) then runs under `sharding.activate`, so the model's logical
constraints split every activation as in a train step and XLA inserts the same gathers
(docs/scale.md, "What each axis communicates"). One video
too long for one device's memory is thus sampled on many.

A row is padded to a multiple of its `sequence` shards with padding tokens (segment id 0 and
position 0, as the packer pads): attention never crosses segment ids, so they change nothing
for the video's tokens and are cut off after sampling. The video equals the unsharded one up
to float reduction order (the fresh noise of "stochastic", "ddpm" and "ddim" with η > 0 is
drawn at the padded shape, so those differ by the draw).
"""

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from vdit import axes, sharding
from vdit.diffusion import objectives
from vdit.diffusion.given_frames import InputError

MeshRequest = Mesh | Mapping[str, int] | str | None


def parse(request: str) -> dict[str, int]:
  """A mesh written "sequence:4,tensor:2" → {"sequence": 4, "tensor": 2} (axes not named are 1;
  one size may be −1, all remaining devices)."""
  out = {}
  for item in filter(None, (s.strip() for s in request.split(","))):
    name, colon, size = item.partition(":")
    if not colon or name not in sharding.MESH_AXES:
      raise InputError(
        f"mesh={request!r}: {item!r} is not axis:size with an axis of {sharding.MESH_AXES}"
      )
    try:
      out[name] = int(size)
    except ValueError:
      raise InputError(f"mesh={request!r}: size {size!r} of {name} is not an integer") from None
  return out


def make(request: MeshRequest, devices: Sequence[jax.Device] | None = None) -> Mesh | None:
  """The sampling mesh: a `Mesh` as given; `{"sequence": 8}` or "sequence:8" over all devices
  (or `devices`; the sizes' product must be their number, or one size −1); None or "" → None
  (no mesh: the params' own placement, no sharding constraints)."""
  if request is None or isinstance(request, Mesh):
    return request
  if isinstance(request, str):
    request = parse(request)
  if not request:
    return None
  try:
    return sharding.make_mesh(request, devices)
  except ValueError as e:
    raise InputError(f"sampling mesh: {e}") from None


def shards(mesh: Mesh | None, rules, logical: str) -> int:
  """How many pieces the rules cut an array's `logical` axis into on `mesh` (1 without one)."""
  if mesh is None:
    return 1
  names = nn.logical_to_mesh_axes((logical,), rules)[0]
  names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
  return math.prod(mesh.shape[n] for n in names)


def padded_length(length: int, mesh: Mesh | None, rules) -> int:
  """`length` rounded up to a multiple of its `sequence` shards."""
  s = shards(mesh, rules, axes.LENGTH)
  return -(-length // s) * s


def param_shardings(model: nn.Module, dummy_inputs: Callable[[], tuple], mesh: Mesh, rules) -> Any:
  """The params' shardings on `mesh` by the rules, from `eval_shape` of `init` on
  `dummy_inputs()` (shapes only: nothing is allocated or computed)."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *dummy_inputs()))
  return sharding.tree_shardings(mesh, rules, boxed["params"])


def _pad(x: np.ndarray, length: int) -> np.ndarray:
  """Zeros appended along axis 1 (the tokens) up to `length`."""
  x = np.asarray(x)
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return np.pad(x, pad)


def place(
  mesh: Mesh,
  rules,
  rows: dict,
  noise: np.ndarray,
  x_cond: np.ndarray,
  cond_mask: np.ndarray,
  x_init: np.ndarray,
  rng: jax.Array,
) -> tuple:
  """The sampler's arrays on `mesh` by the rules, the tokens padded to their `sequence` shards:
  (rows, noise, x_cond, cond_mask, x_init, rng) as `objectives.sample_rows` takes them."""
  n, length = noise.shape[:2]
  row_shards = shards(mesh, rules, axes.BATCH)
  if n % row_shards:
    raise InputError(
      f"{n} video(s) cannot be split over the mesh's {row_shards} row shards "
      f"(data × fsdp = {dict(mesh.shape)}); give a multiple of {row_shards} prompts, or put "
      "the devices on sequence/tensor"
    )
  padded = padded_length(length, mesh, rules)
  tokens = lambda key: sharding.BATCH_AXES[key][1:2] == (axes.LENGTH,)  # [B, L, ...] arrays
  rows = {k: _pad(v, padded) if tokens(k) else np.asarray(v) for k, v in rows.items()}
  rows = jax.device_put(rows, sharding.batch_shardings(mesh, rules, rows))
  per_token = sharding.batch_shardings(mesh, rules, {"patches": 0, "cond_mask": 0})
  x = [jax.device_put(_pad(a, padded), per_token["patches"]) for a in (noise, x_cond, x_init)]
  mask = jax.device_put(_pad(cond_mask, padded), per_token["cond_mask"])
  return rows, x[0], x[1], mask, x[2], jax.device_put(rng, sharding.replicated(mesh))


def sample_rows(
  model: nn.Module,
  params: Any,
  mesh: Mesh | None,
  rules,
  rows: dict,
  noise: np.ndarray,
  x_cond: np.ndarray,
  cond_mask: np.ndarray,
  x_init: np.ndarray,
  rng: jax.Array,
  scale: float,
  interval: tuple[float, float],
  **options,
) -> jax.Array:
  """`objectives.sample_rows` (same arguments; `options`: spec, steps, sampler, strength) on
  `mesh`: x0 [N, L', P], tokens sharded over `sequence`, L' the length padded to its shards
  (the first L tokens are the video's). Without a mesh, the plain call (L' = L)."""
  arrays = (rows, noise, x_cond, cond_mask, x_init, rng)
  if mesh is None:
    return objectives.sample_rows(model, params, *arrays, scale, interval, **options)
  arrays = place(mesh, rules, *arrays)
  with sharding.activate(mesh, rules):
    return objectives.sample_rows(model, params, *arrays, scale, interval, **options)
