"""Shared building blocks: logical axis names, attention backends, conditioning, positions.

Every parameter is created with `nn.with_logical_partitioning` and every large activation is
constrained with `nn.with_logical_constraint`, using the logical axis names below. The mapping
from logical names to mesh axes lives in the config (`config.sharding_rules`), never here.
"""

# Logical axis names (DESIGN.md, "Sharding").
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV = "kv"
TEXT_LENGTH = "text_length"
PATCH = "patch"
LAYERS = "layers"
VOCAB = "vocab"
