"""What a run trains: `config.task` names a `Task` (default "video_diffusion").

A task bundles what differs between the models trained by `vdit.train`: the model, the batches
(packed rows or fixed-size clips), the loss, the config checks and the predict functions that
the evaluators of `config.evals` receive (`Task.predict_fns`). Everything else — mesh, sharding,
optimizer, EMA, checkpoints, preemption, logging, evaluation — is shared.

  video_diffusion   VideoDiT text-to-video on packed spacetime patches (the Sora recipe)
  image_diffusion   DiT class-conditional on fixed-size frames (Peebles & Xie)
  classification    ViT / ViViT on fixed-size clips, NaViT on packed native-size images
  autoencoder       the causal video VAE (latent space) on fixed-size clips
  captioning        a caption decoder over packed native-size videos, or over prompts
                    (prompt expansion)
"""

import importlib

import ml_collections

from vdit.tasks.base import Task

# name -> (module, class), imported by name when used: the task modules import the sampler,
# which restores runs through this registry (big_vision looks its modules up the same way).
TASKS: dict[str, tuple[str, str] | type[Task]] = {
  "video_diffusion": ("vdit.tasks.video_diffusion", "VideoDiffusion"),
  "image_diffusion": ("vdit.tasks.image_diffusion", "ImageDiffusion"),
  "classification": ("vdit.tasks.classification", "Classification"),
  "autoencoder": ("vdit.tasks.autoencoding", "AutoencoderTask"),
  "captioning": ("vdit.tasks.captioning", "Captioning"),
}


def register(name: str, cls: type[Task]) -> None:
  """Adds a task (e.g. from an extension module) under `name`."""
  TASKS[name] = cls


def name_of(config: ml_collections.ConfigDict) -> str:
  return config.get("task", "video_diffusion")


def get(config: ml_collections.ConfigDict) -> Task:
  """The task named by `config.task`; an unknown name is a `ValueError` listing the known ones."""
  name = name_of(config)
  if name not in TASKS:
    raise ValueError(f"task={name!r} is unknown; expected one of {sorted(TASKS)}")
  cls = TASKS[name]
  if isinstance(cls, tuple):
    module, class_name = cls
    cls = getattr(importlib.import_module(module), class_name)
  return cls()


__all__ = ["TASKS", "Task", "get", "name_of", "register"]
