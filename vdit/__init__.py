"""vdit: Sora-style video diffusion transformers in JAX/Flax (see DESIGN in README/docs)."""

__version__ = "0.1.0"
