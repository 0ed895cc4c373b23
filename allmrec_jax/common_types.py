"""Shared type aliases and logical-axis names.

Parameters are named by logical axes at creation (`nn.with_logical_partitioning`); the
config's `mesh.logical_axis_rules` maps them onto the ("data", "fsdp", "tensor") mesh.
"""

from typing import Any

import jax
import numpy as np

Array = jax.Array
PRNGKey = jax.Array
PyTree = Any
Shape = tuple[int, ...]
DType = Any
NpArray = np.ndarray

# Mesh axes.
DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# Parameter logical axes.
VOCAB = "vocab"      # token vocabulary rows
EMBED = "embed"      # model width (LLM E, CF D, SBERT t)
MLP = "mlp"          # FFN hidden width
HEADS = "heads"      # attention heads (query heads, or heads*head_dim fused)
KV = "kv"            # key/value heads (GQA) or head_dim
ITEMS = "items"      # CF item-table rows
LATENT = "latent"    # stage-1 joint-embedding width (128)
NORM = "norm"        # 1-D scale/bias vectors (replicated)

# Activation logical axes.
ACT_BATCH = "act_batch"
ACT_LEN = "act_len"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_VOCAB = "act_vocab"
