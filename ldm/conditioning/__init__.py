"""Conditioners: batch field(s) -> part of the backbone's ``cond`` dict, plus the dropout that makes CFG
possible.

Every conditioner has ``batch_key`` (the batch field(s) it reads), ``output`` (its kind: "crossattn", "vector"
or "concat"), ``output_dim``, ``dropout_prob``, ``guidance`` (whether CFG nulls it),
``forward(inputs) -> dict``, ``drop(inputs, generator)`` and ``null_inputs(n)``. A model's conditioners are
merged by ``MultiConditioner`` (``ldm.conditioning.multi``); a single one is a list of one.
"""

from ldm.conditioning.concat import ConcatConditioner
from ldm.conditioning.labels import ClassConditioner, dropout_mask
from ldm.conditioning.multi import MultiConditioner, as_multi, label_ids
from ldm.conditioning.precomputed import replace_rows
from ldm.conditioning.size import SizeConditioner, size_inputs
from ldm.conditioning.text import TextConditioner, minilm_path

__all__ = [
    "ClassConditioner",
    "ConcatConditioner",
    "MultiConditioner",
    "SizeConditioner",
    "TextConditioner",
    "as_multi",
    "dropout_mask",
    "label_ids",
    "minilm_path",
    "replace_rows",
    "size_inputs",
]
