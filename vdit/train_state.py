"""The train state, the optimizer, and creating the state sharded from `eval_shape`."""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from vdit import section_spec, sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of applied updates
  params: Any
  opt_state: Any
  ema_params: Any  # exponential moving average of params, used for sampling
  rng: jax.Array  # base key; the step's key is fold_in(rng, step)
  skipped: jax.Array  # int32: updates skipped because loss/grads were not finite


OPTIMIZERS = ("adamw", "muon")


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """The `optimizer` section: its keys, types and defaults (`vdit.section_spec`)."""

  name: str = "adamw"  # or "muon" (2-D kernels; `make_optimizer`)
  lr: float = 1e-3  # peak learning rate
  warmup_steps: int = 0
  final_lr_fraction: float = 0.1  # the cosine decays to lr × this
  grad_clip: float = 1.0  # global-norm clipping
  b1: float = 0.9
  b2: float = 0.999
  weight_decay: float = 0.0  # AdamW's, on kernels only (≥ 2-D params)
  ema_decay: float = 0.9999  # EMA of the params (the params evaluated and sampled)
  schedule_steps: int = 0  # length of the warmup+cosine schedule; 0 → total_steps
  grad_accum_steps: int = 1  # microbatches per update (optax.MultiSteps)

  @property
  def accumulation(self) -> int:
    """Microbatches per optimizer update (at least 1)."""
    return max(self.grad_accum_steps, 1)


def optimizer_spec(opt: Mapping[str, Any]) -> Optimizer:
  """The `optimizer` section as its typed spec (defaults for absent keys)."""
  return section_spec.read(Optimizer, opt, "optimizer")


def accumulation_steps(opt: Mapping[str, Any]) -> int:
  """Microbatches per optimizer update (`optimizer.grad_accum_steps`, default 1)."""
  return optimizer_spec(opt).accumulation


def _base_schedule(opt: Optimizer, total_steps: int) -> optax.Schedule:
  total_steps = opt.schedule_steps or total_steps
  warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=opt.lr,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=opt.lr * opt.final_lr_fraction,
  )


def learning_rate_schedule(opt: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Linear warmup to `opt.lr`, then cosine decay to `opt.lr * opt.final_lr_fraction`.

  A function of the train step (one microbatch). The decay spans `opt.schedule_steps` if set,
  else `total_steps` (so extending a finished run with a larger `total_steps` re-stretches the
  cosine unless `schedule_steps` pins it). With gradient accumulation over k microbatches, the
  rate is held for each window of k steps at its value at the window's first step: all of
  `total_steps`, `warmup_steps` and `schedule_steps` count train steps, not updates.
  """
  opt = optimizer_spec(opt)
  base, k = _base_schedule(opt, total_steps), opt.accumulation
  if k == 1:
    return base
  return lambda step: base((step // k) * k)


def make_optimizer(opt: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
  """AdamW (or Muon) with global-norm clipping; no weight decay on biases, norms and embeddings'
  scales.

  `opt.name = "muon"`: `optax.contrib.muon` on the 2-D dense kernels (Newton-Schulz
  orthogonalised momentum, Jordan et al. 2024), with its update RMS matched to AdamW's
  (`consistent_rms=0.2`, Liu et al. 2025 "Muon is Scalable for LLM Training"), so the same
  learning rate serves both; AdamW (`b1`, `b2`, with Nesterov momentum as optax's muon applies
  it) on every other parameter (embedding tables, biases, norms, kernels of rank ≠ 2).

  `opt.grad_accum_steps = k > 1` wraps it in `optax.MultiSteps`: each train step adds one
  microbatch's gradient to an accumulator (sharded like the params) and every k-th step
  applies the optimizer to the mean (clipping the mean, not the parts); the other steps return
  zero updates. The global batch of one update is then k × `input.rows_per_batch` rows.
  """
  opt = optimizer_spec(opt)
  base, k = _base_schedule(opt, total_steps), opt.accumulation
  # The inner count is the number of applied updates u; update u uses train step u·k.
  lr = base if k == 1 else (lambda u: base(u * k))

  def decay_mask(params):
    return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)

  name = opt.name
  if name == "adamw":
    inner = optax.adamw(
      learning_rate=lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask
    )
  elif name == "muon":

    def muon_dims(params):  # the 2-D kernels; None = AdamW. Params may be boxed (logical axes).
      def dims(path, p):
        is_kernel = getattr(path[-1], "key", None) == "kernel"
        ndim = (p.value if isinstance(p, nn.Partitioned) else p).ndim
        return optax.contrib.MuonDimensionNumbers() if is_kernel and ndim == 2 else None

      boxed = lambda x: isinstance(x, nn.Partitioned)
      return jax.tree_util.tree_map_with_path(dims, params, is_leaf=boxed)

    # No weight decay (config_checks): optax's muon has no decay mask for its AdamW part.
    inner = optax.contrib.muon(
      learning_rate=lr,
      consistent_rms=0.2,
      adam_b1=opt.b1,
      adam_b2=opt.b2,
      muon_weight_dimension_numbers=muon_dims,
    )
  else:
    raise ValueError(f"optimizer.name={name!r} is not one of {OPTIMIZERS}")
  tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), inner)
  if k == 1:
    return tx
  return optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()


def ema_decay(step: jax.Array, decay: float, warmup: bool = True) -> jax.Array:
  """EMA decay, optionally warmed up as min(decay, (1 + step) / (10 + step))."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


class ModelSource(Protocol):
  """Where `build` gets the model and its init inputs: a `vdit.tasks.Task` passes itself."""

  def build_model(self, config: ml_collections.ConfigDict) -> nn.Module: ...

  def dummy_inputs(self, config: ml_collections.ConfigDict) -> tuple: ...


@dataclasses.dataclass(frozen=True)
class StateBuilder:
  """A config's model, optimizer and train state on a mesh: abstract, or created sharded."""

  model: nn.Module
  tx: optax.GradientTransformation
  abstract: TrainState  # ShapeDtypeStructs with shardings: the target of a checkpoint restore
  shardings: TrainState  # NamedSharding of every leaf: the train step's in/out shardings
  mesh: Mesh
  rules: Any  # logical -> mesh axis rules
  init: Callable[[], TrainState] = dataclasses.field(repr=False)  # the boxed initial state

  def create(self, params: Any = None) -> TrainState:
    """The initial state (params of `config.seed`, or the given `params` of this model: a
    run's `init_from`), made directly in its sharded layout. Given params start the EMA too,
    and a fresh optimizer state."""
    with sharding.activate(self.mesh, self.rules):
      if params is None:
        return jax.jit(lambda: nn.meta.unbox(self.init()), out_shardings=self.shardings)()

      def start(p):
        return dataclasses.replace(
          nn.meta.unbox(self.init()), params=p, ema_params=p, opt_state=self.tx.init(p)
        )

      return jax.jit(start, out_shardings=self.shardings)(params)


def build(config: ml_collections.ConfigDict, mesh: Mesh, rules, task: ModelSource) -> StateBuilder:
  """The one state recipe: model → optimizer → init → eval_shape → shardings.

  Used by the trainer, restore, aot, the benchmarks and the tests. The task passes itself
  (`vdit.tasks.get(config)`) because tasks sit a layer above this one: looking it up here would
  be an upward import, and taking a bare model would leave each caller to pair it with the right
  init inputs (a classifier's clips, a VAE's frames).
  """
  model = task.build_model(config)
  tx = make_optimizer(config.optimizer, config.total_steps)
  init = _init_fn(model, task.dummy_inputs(config), tx, config.seed)
  abstract, shardings = _abstract_state(init, mesh, rules)
  return StateBuilder(model, tx, abstract, shardings, mesh, rules, init)


def _init_fn(
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


def _abstract_state(init: Callable[[], TrainState], mesh: Mesh, rules) -> tuple[TrainState, Any]:
  """Shape/dtype/sharding structs of the state, and its shardings (from eval_shape, no compute)."""
  with sharding.activate(mesh, rules):
    boxed = jax.eval_shape(init)
    shardings = sharding.tree_shardings(mesh, rules, boxed)
  # Strip the partitioning metadata without a sharding constraint: these are shapes, and this
  # may run inside another mesh's context (e.g. a VAE restored by an evaluator mid-training).
  unboxed = jax.tree_util.tree_map(
    lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
    boxed,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )
  structs = jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings
  )
  return structs, shardings


def num_params(params: Any) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))
