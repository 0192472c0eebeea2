"""The train state, the optimizer, and creating the state sharded from `eval_shape`."""

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from vdit import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of applied updates
  params: Any
  opt_state: Any
  ema_params: Any  # exponential moving average of params, used for sampling
  rng: jax.Array  # base key; the step's key is fold_in(rng, step)
  skipped: jax.Array  # int32: updates skipped because loss/grads were not finite


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `opt.lr`, then cosine decay to `opt.lr * opt.final_lr_fraction`.

  The decay spans `opt.schedule_steps` if set, else `total_steps` (so extending a finished
  run with a larger `total_steps` re-stretches the cosine unless `schedule_steps` pins it).
  """
  total_steps = opt.get("schedule_steps") or total_steps
  warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=opt.lr,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=opt.lr * opt.final_lr_fraction,
  )


def make_optimizer(
  opt: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
  """AdamW with global-norm clipping; no weight decay on biases, norms and embeddings' scales."""

  def decay_mask(params):
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)

  return optax.chain(
    optax.clip_by_global_norm(opt.grad_clip),
    optax.adamw(
      learning_rate=learning_rate_schedule(opt, total_steps),
      b1=opt.b1,
      b2=opt.b2,
      weight_decay=opt.weight_decay,
      mask=decay_mask,
    ),
  )


def ema_decay(step: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
  """EMA decay, optionally warmed up as min(decay, (1 + step) / (10 + step))."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def init_fn(
  model: nn.Module, dummy_inputs: tuple, tx: optax.GradientTransformation, seed: int
) -> Callable[[], TrainState]:
  """A function creating the (boxed, logically partitioned) initial train state."""

  def init() -> TrainState:
    rng = jax.random.PRNGKey(seed)  # raw uint32 key: plain array for orbax
    params_rng, state_rng = jax.random.split(rng)
    params = model.init({"params": params_rng}, *dummy_inputs)["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=params,
      rng=state_rng,
      skipped=jnp.zeros((), jnp.int32),
    )

  return init


def create_sharded(init: Callable[[], TrainState], mesh: Mesh, rules) -> tuple[TrainState, Any]:
  """Creates the state directly in its sharded layout: eval_shape → specs → jit(out_shardings).

  Returns the (unboxed) state and its shardings.
  """
  with sharding.activate(mesh, rules):
    boxed = jax.eval_shape(init)
    shardings = sharding.tree_shardings(mesh, rules, boxed)
    state = jax.jit(lambda: nn.meta.unbox(init()), out_shardings=shardings)()
  return state, shardings


def abstract_state(init: Callable[[], TrainState], mesh: Mesh, rules) -> tuple[TrainState, Any]:
  """Shape/dtype/sharding structs of the state (the target for restoring a checkpoint)."""
  with sharding.activate(mesh, rules):
    boxed = jax.eval_shape(init)
    shardings = sharding.tree_shardings(mesh, rules, boxed)
  unboxed = nn.meta.unbox(boxed)
  structs = jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings
  )
  return structs, shardings


def num_params(params: Any) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))
