"""Several conditioners, one ``cond`` dict: the model's whole conditioning (sgm's GeneralConditioner,
simplified).

A model holds a list of conditioners (``ldm.interfaces.Conditioner``). Each reads its batch field(s)
(``batch_key``), has an output kind (``output``: "crossattn" tokens, a "vector" added to the timestep
embedding, or "concat" channels joined to the input), its own dropout rate (``dropout_prob``, the
training-time null inputs that make classifier-free guidance possible; Ho & Salimans 2022, Algorithm 1) and
its own null input (``null_inputs``), and says whether guidance nulls it (``guidance``). Their outputs are
merged by kind:

    context       (B, L_1 + L_2 + ..., D)  the crossattn conditioners' tokens, in list order (one width D)
    context_mask  (B, L_1 + L_2 + ...)     their masks (all True for a conditioner without one)
    vector        (B, V_1 + V_2 + ...)     the vector conditioners' outputs, concatenated
    concat        (B, C_1 + C_2 + ..., h, w)

A single configured conditioner is a list of one: ``as_multi`` wraps it on the fly (no new parameters, so its
state-dict keys stay ``conditioner.*`` and checkpoints made before this module load unchanged), and with one
conditioner the output is exactly that conditioner's (byte-identical samples).

Classifier-free guidance (``guidance_pair``): the unconditional branch replaces every conditioner with
``guidance=True`` (text, labels) by its null input (or the negative prompt) and keeps the others (size
conditioning, inpainting channels) as in the conditional branch, as SDXL does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ldm.conditioning.labels import ClassConditioner, dropout_mask
from ldm.conditioning.precomputed import replace_rows
from ldm.conditioning.size import SizeConditioner, size_inputs
from ldm.conditioning.text import TextConditioner

log = logging.getLogger(__name__)

KINDS = ("crossattn", "vector", "concat")


class MultiConditioner(nn.Module):
    """``forward(batch) -> cond``: every conditioner on its batch field(s), outputs merged by kind (module
    doc)."""

    def __init__(self, conditioners: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(conditioners) == 0:
            raise ValueError("MultiConditioner needs at least one conditioner: list them under conditioners")
        for c in conditioners:
            if getattr(c, "output", None) not in KINDS:
                raise ValueError(
                    f"{type(c).__name__} has output={getattr(c, 'output', None)!r}: give it one of {KINDS}"
                )
        widths = {c.output_dim for c in conditioners if c.output == "crossattn"}
        if len(widths) > 1:
            raise ValueError(
                f"cross-attention conditioners give tokens of different widths {sorted(widths)}: set their "
                "embed_dim (labels) to the text encoder's width, or make one of them output=vector"
            )
        self.conditioners = nn.ModuleList(conditioners)

    # ------------------------------------------------------------------ what the backbone must accept
    def dims(self, kind: str) -> int | None:
        """The width of the merged output of one kind (context D, summed vector / concat channels); None if
        absent."""
        chosen = [c.output_dim for c in self.conditioners if c.output == kind]
        if not chosen:
            return None
        return chosen[0] if kind == "crossattn" else sum(chosen)

    def find(self, kind: type[nn.Module]) -> nn.Module | None:
        """The first conditioner of a class (e.g. ``ClassConditioner`` for ``sample.py label=``), or None."""
        return next((c for c in self.conditioners if isinstance(c, kind)), None)

    # ------------------------------------------------------------------ batch -> cond
    def inputs(self, c: nn.Module, batch: Mapping[str, Any], image_size: Sequence[int] | None) -> Any:
        """The inputs of conditioner ``c`` in ``batch``; one-line error naming the missing field."""
        if isinstance(c, SizeConditioner):
            if image_size is None:
                missing = [k for k in c.batch_key if k not in batch]
                if missing:
                    raise ValueError(
                        f"the batch has no {missing} for size conditioning: pass them as (B, 2) tensors"
                    )
                image_size = (0, 0)
            return c.inputs(batch, batch_size(batch), image_size)
        if c.batch_key not in batch:
            raise KeyError(
                f"{type(c).__name__} reads batch[{c.batch_key!r}] but the batch has {sorted(batch)}: use "
                f"data that carries {c.batch_key!r} or remove the conditioner"
            )
        return batch[c.batch_key]

    def one(
        self,
        c: nn.Module,
        batch: Mapping[str, Any],
        generator: torch.Generator | None,
        image_size: Sequence[int] | None,
    ) -> dict[str, Tensor]:
        """One conditioner's output for a batch; with a generator (training) some inputs become its null
        input.

        Latent shards may carry the frozen text encoder's output ("context"/"context_mask"): then the encoder
        is skipped and dropped rows get the null input's embedding (``replace_rows``)."""
        if isinstance(c, TextConditioner) and "context" in batch:
            context, mask = batch["context"], batch["context_mask"]  # (B, L, D), (B, L)
            if generator is not None:
                drop = dropout_mask(context.shape[0], c.dropout_prob, generator)  # (B,)
                null = c.encode(c.null_inputs(1))
                context, mask = replace_rows(context, mask, null["context"], null["context_mask"], drop)
            return c.from_embeddings(context, mask)
        inputs = self.inputs(c, batch, image_size)
        if generator is not None:
            inputs = c.drop(inputs, generator=generator)
        return c(inputs)

    def forward(
        self,
        batch: Mapping[str, Any],
        generator: torch.Generator | None = None,
        image_size: Sequence[int] | None = None,
    ) -> dict[str, Tensor]:
        """batch {field: inputs} -> cond {COND_KEYS: tensors}; ``generator`` draws the training dropout (each
        conditioner in list order); ``image_size`` [H, W] fills size fields the batch lacks."""
        return merge([self.one(c, batch, generator, image_size) for c in self.conditioners])

    # ------------------------------------------------------------------ classifier-free guidance
    def guidance_pair(
        self,
        batch: Mapping[str, Any],
        negatives: Mapping[str, Any] | None = None,
        image_size: Sequence[int] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(cond, uncond) for ``CFGDenoiser``: uncond has each ``guidance`` conditioner on its null input (or
        on ``negatives[batch_key]``, e.g. a negative prompt) and every other conditioner on its conditional
        input."""
        negatives = negatives or {}
        n = batch_size(batch)
        cond_parts, uncond_parts = [], []
        for c in self.conditioners:
            part = self.one(c, batch, None, image_size)
            cond_parts.append(part)
            if not c.guidance:
                uncond_parts.append(part)
            elif isinstance(c.batch_key, str) and c.batch_key in negatives:
                uncond_parts.append(c(negatives[c.batch_key]))
            elif c.output == "concat":
                uncond_parts.append({"concat": torch.zeros_like(part["concat"])})
            else:
                uncond_parts.append(c(c.null_inputs(n)))
        return merge(cond_parts), merge(uncond_parts)

    # ------------------------------------------------------------------ checkpoints
    def frozen_prefixes(self, prefix: str) -> list[str]:
        """State-dict prefixes of the conditioners without trainable parameters (rebuilt from their own
        weights)."""
        return [
            f"{prefix}conditioners.{i}."
            for i, c in enumerate(self.conditioners)
            if not any(p.requires_grad for p in c.parameters())
        ]


def as_multi(conditioner: nn.Module) -> MultiConditioner:
    """The conditioner as a list of conditioners: itself if it is one, else a list of one (a view: no
    copy)."""
    return conditioner if isinstance(conditioner, MultiConditioner) else MultiConditioner([conditioner])


def batch_size(batch: Mapping[str, Any]) -> int:
    """B of a batch dict: the length of its first tensor or list (0 for an empty batch)."""
    for value in batch.values():
        if isinstance(value, Tensor | list | tuple):
            return len(value)
    return 0


def merge(parts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Outputs of several conditioners -> one cond dict (module doc); a single part is returned as it is."""
    if len(parts) == 1:
        return dict(parts[0])
    out: dict[str, Tensor] = {}
    tokens = [p for p in parts if "context" in p]
    if tokens:
        out["context"] = torch.cat([p["context"] for p in tokens], dim=1)  # (B, sum L, D)
        masks = [p.get("context_mask") for p in tokens]
        out["context_mask"] = torch.cat(
            [
                m.bool()
                if m is not None
                else torch.ones(p["context"].shape[:2], dtype=torch.bool, device=p["context"].device)
                for p, m in zip(tokens, masks, strict=True)
            ],
            dim=1,
        )  # (B, sum L)
    for key, dim in (("vector", 1), ("concat", 1)):
        chosen = [p[key] for p in parts if key in p]
        if chosen:
            out[key] = torch.cat(chosen, dim=dim)  # (B, sum V) / (B, sum C, h, w)
    return out


def label_ids(conditioner: nn.Module, labels: Sequence[str | int]) -> Tensor:
    """Class ids (B,) long for names or ids through the model's label vocabulary
    (``ClassConditioner.labels``)."""
    found = as_multi(conditioner).find(ClassConditioner)
    if found is None:
        raise ValueError("label= given but the model has no class-label conditioner: pass prompt= instead")
    return torch.tensor([found.label_id(v) for v in labels], dtype=torch.long)


def sampling_inputs(
    conditioner: nn.Module,
    prompts: Sequence[str] | None,
    labels: Sequence[str | int] | None = None,
    image_size: Sequence[int] | None = None,
    original_size: Sequence[int] | None = None,
    crop_top_left: Sequence[int] | None = None,
) -> Sequence[Any] | dict[str, Any]:
    """What ``ldm.generate.generate`` takes for ``n`` images: the captions (or label ids) for a single
    conditioner, exactly as before, or {batch_key: inputs} for several. A missing caption or label is the null
    input (the model saw it under dropout), sizes default to ``image_size`` uncropped (SDXL
    micro-conditioning)."""
    n = len(prompts) if prompts is not None else len(labels or [])
    if not isinstance(conditioner, MultiConditioner):
        if isinstance(conditioner, ClassConditioner):
            if labels is None:
                raise ValueError("this model is conditioned on class labels: pass label=<name or id>")
            return label_ids(conditioner, labels).tolist()  # a list of ids, like a list of captions
        if prompts is None:
            raise ValueError('no prompt given: pass prompt="red apple" or prompts_file=FILE')
        return list(prompts)
    inputs: dict[str, Any] = {}
    for c in conditioner.conditioners:
        if isinstance(c, TextConditioner):
            inputs[c.batch_key] = list(prompts) if prompts is not None else c.null_inputs(n)
        elif isinstance(c, ClassConditioner):
            inputs[c.batch_key] = label_ids(c, labels) if labels is not None else c.null_inputs(n)
        elif isinstance(c, SizeConditioner):
            if image_size is None:
                raise ValueError("this model has size conditioning: pass size=[H,W]")
            inputs.update(size_inputs(n, image_size, original_size, crop_top_left))
        else:
            raise ValueError(
                f"sampling cannot fill the inputs of {type(c).__name__} (batch[{c.batch_key!r}])"
            )
    return inputs


__all__ = ["MultiConditioner", "as_multi", "batch_size", "label_ids", "merge", "sampling_inputs"]
