"""Conditioners: batch field -> cross-attention context, plus the caption/label dropout for CFG.

Every conditioner has ``batch_key`` (the batch field it reads), ``output_dim`` (context size D),
``forward(inputs) -> {"context": (B, L, D), "context_mask": (B, L) bool}``, ``drop(inputs, generator)``
and ``null_inputs(n)``.
"""

from ldm.conditioning.labels import ClassConditioner, dropout_mask
from ldm.conditioning.precomputed import replace_rows
from ldm.conditioning.text import TextConditioner, minilm_path

__all__ = ["ClassConditioner", "TextConditioner", "dropout_mask", "minilm_path", "replace_rows"]
