"""Lazy, strict, memory-frugal loading of safetensors checkpoints into meta-built modules."""

from .assign import assert_materialized, expected_tensors, load_into
from .checkpoint import Checkpoint, CheckpointError, TensorInfo, read_config, read_header
from .fields import Fields

__all__ = [
    "Checkpoint", "CheckpointError", "Fields", "TensorInfo", "read_config", "read_header",
    "load_into", "expected_tensors", "assert_materialized",
]
