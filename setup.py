"""vdit: Sora-style video diffusion transformers in JAX/Flax.

Install for development with the pinned versions the project is tested with:

  pip install -c constraints.txt -e '.[dev]'
"""

import setuptools

setuptools.setup(
  name="vdit",
  version="0.1.0",
  description="Sora-style video diffusion transformer over packed spacetime patches (JAX/Flax).",
  packages=setuptools.find_packages(include=["vdit", "vdit.*"]),
  python_requires=">=3.11",
  install_requires=[
    "jax==0.10.2",  # splash-attention internals are pinned to this version (DESIGN.md)
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "tensorflow-datasets",
    "array-record",
    "ml-collections",
    "clu",
    "absl-py",
    "numpy",
    "imageio",
    "imageio-ffmpeg",
    "pillow",
    "scikit-image",
    "scikit-learn",
    "threadpoolctl",
    "safetensors",  # reading diffusers checkpoints without torch (vdit.models.convert)
    # Only to build TFDS datasets and for clu's TensorBoard writer; never in the hot path.
    "tensorflow-cpu",
    "tensorboard",
  ],
  extras_require={
    "dev": [
      "pytest",
      "pytest-xdist",
      "ruff",
      # notebooks/: executed by tests/test_notebooks.py
      "nbformat",
      "nbclient",
      "ipykernel",
      "matplotlib",
    ],
    "tpu": ["libtpu"],
    "video": ["av"],
  },
)
