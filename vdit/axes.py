"""Logical axis names: the names every weight, activation and batch array is sharded by.

Modules name their arrays' axes with these constants (`nn.with_logical_partitioning`,
`nn.with_logical_constraint`); the config maps them to mesh axes (`config.sharding_rules`,
DESIGN.md "Sharding"). This module imports nothing from vdit, so anything may name an axis.
"""

BATCH = "batch"  # batch rows (B)
LENGTH = "length"  # packed token length of a row (L)
EMBED = "embed"  # model width (D)
MLP = "mlp"  # MLP hidden width
HEADS = "heads"  # attention heads (H)
KV = "kv"  # per-head width
TEXT_LENGTH = "text_length"  # packed text tokens of a row (M)
PATCH = "patch"  # patch vector (P)
LAYERS = "layers"  # scanned depth
VOCAB = "vocab"  # text vocabulary
