"""Class-label conditioning and the condition dropout shared by every conditioner.

Labels become a one-token cross-attention context (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", Sec. 3.3: tau_theta(y) fed to cross-attention). The extra embedding row
``num_classes`` is the learned null label that classifier-free guidance uses as the unconditional input
(Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", Algorithm 1: c <- null with prob. p_uncond).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def check_dropout_prob(dropout_prob: float) -> float:
    """Return ``dropout_prob`` as a float, or raise if it is not a probability."""
    if not 0.0 <= float(dropout_prob) <= 1.0:
        raise ValueError(
            f"dropout_prob={dropout_prob} is not a probability: set conditioner.dropout_prob in [0, 1]"
        )
    return float(dropout_prob)


def check_output(output: str, allowed: Sequence[str]) -> str:
    """Return ``output`` if this conditioner can produce that kind (``ldm.interfaces.OUTPUT_KINDS``), else
    raise."""
    if output not in allowed:
        raise ValueError(
            f"output={output!r} is not one of {list(allowed)}: set conditioner.output to one of them"
        )
    return output


def dropout_mask(n: int, dropout_prob: float, generator: torch.Generator | None = None) -> Tensor:
    """Draw which of ``n`` items become the null condition (Ho & Salimans 2022, Algorithm 1).

    Each item is dropped independently with probability ``dropout_prob``. The draw happens on the
    generator's device (CPU when ``generator`` is None, then from the global RNG), so a seeded generator
    gives the same drops on every run. Returns a ``(n,)`` bool tensor on that device; True = drop.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(n, generator=generator, device=device)  # (n,) uniform in [0, 1)
    return u < dropout_prob  # (n,) bool: p=0 drops none, p=1 drops all


class ClassConditioner(nn.Module):
    """Learned label embedding (trainable); null label = ``num_classes``.

    ``forward(labels)`` maps ``(B,)`` integer labels to ``{"context": (B, 1, D), "context_mask": (B, 1)}``
    (``output="crossattn"``, a one-token context) or to ``{"vector": (B, D)}`` (``output="vector"``: added to
    the timestep embedding, DiT's class conditioning through adaLN, Peebles & Xie 2023, Sec. 3.2).

    ``labels`` is the vocabulary (name of class i at index i), so ``sample.py label=<name>`` needs no data: it
    is part of the config stored in every checkpoint. train.py fills ``labels`` (and ``num_classes`` when
    null) from the training shards' ``index.json`` ``"labels"`` (``fill_label_vocabulary``).
    """

    batch_key: str = "cls"
    guidance: bool = True

    def __init__(
        self,
        num_classes: int | None,
        embed_dim: int,
        dropout_prob: float = 0.1,
        output: str = "crossattn",
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if num_classes is None and labels is None:
            raise ValueError(
                "ClassConditioner needs num_classes or labels: set conditioner.num_classes, or train on "
                "shards whose index.json lists labels (train.py fills them in)"
            )
        num_classes = len(labels) if num_classes is None else num_classes
        if num_classes < 1 or embed_dim < 1:
            raise ValueError(
                f"ClassConditioner needs num_classes >= 1 and embed_dim >= 1, got {num_classes} and "
                f"{embed_dim}"
            )
        self.num_classes = int(num_classes)
        self.output_dim = int(embed_dim)
        self.dropout_prob = check_dropout_prob(dropout_prob)
        self.output = check_output(output, ("crossattn", "vector"))
        self.labels: list[str] | None = None
        if labels is not None:
            self.set_vocabulary(labels)
        # Rows 0..num_classes-1 are the classes, row num_classes is the learned null label. N(0, 1) init.
        self.embedding = nn.Embedding(self.num_classes + 1, self.output_dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def set_vocabulary(self, labels: Sequence[str]) -> None:
        """Name the classes: ``labels[i]`` is class i; there must be exactly ``num_classes`` distinct
        names."""
        names = [str(n) for n in labels]
        if len(names) != self.num_classes or len(set(names)) != len(names):
            raise ValueError(
                f"the label vocabulary has {len(names)} names ({len(set(names))} distinct) but num_classes="
                f"{self.num_classes}: set conditioner.num_classes={len(names)} or fix the labels list"
            )
        self.labels = names

    def label_id(self, label: str | int) -> int:
        """A class id from an id or a name of the vocabulary; one-line error listing a few names otherwise."""
        if isinstance(label, int) or (isinstance(label, str) and label.strip().lstrip("-").isdigit()):
            value = int(label)
            if not 0 <= value < self.num_classes:
                raise ValueError(
                    f"label={value} is not a class id in [0, {self.num_classes - 1}]: pass one of them"
                )
            return value
        if self.labels is None:
            raise ValueError(
                f"label={label!r} is a name but the model stores no label vocabulary: pass a class id"
            )
        if label not in self.labels:
            shown = ", ".join(self.labels[:8]) + (", ..." if len(self.labels) > 8 else "")
            raise ValueError(
                f"label={label!r} is not in the model's vocabulary ({shown}): pass one of its names or an id"
            )
        return self.labels.index(label)

    def _as_labels(self, inputs: Tensor | Sequence[int], allow_null: bool) -> Tensor:
        """Validate and return labels as a ``(B,)`` long tensor on the embedding's device."""
        device = self.embedding.weight.device
        labels = torch.as_tensor(inputs, device=device)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(
                f"class labels must be integers, got dtype {labels.dtype}: pass a torch.long tensor"
            )
        if labels.ndim != 1:
            raise ValueError(
                f"class labels must have shape (B,), got {tuple(labels.shape)}: flatten the batch field"
            )
        labels = labels.long()
        top = self.num_classes if allow_null else self.num_classes - 1
        if labels.numel() > 0 and (int(labels.min()) < 0 or int(labels.max()) > top):
            raise ValueError(
                f"class labels must lie in [0, {top}] but got range [{int(labels.min())}, "
                f"{int(labels.max())}]: set conditioner.num_classes to the number of classes in the data "
                f"(null label = num_classes)"
            )
        return labels

    def forward(self, inputs: Tensor | Sequence[int]) -> dict[str, Tensor]:
        labels = self._as_labels(inputs, allow_null=True)  # (B,)
        if self.output == "vector":
            return {"vector": self.embedding(labels)}  # (B, D)
        context = self.embedding(labels)[:, None, :]  # (B, 1, D)
        mask = torch.ones(labels.shape[0], 1, dtype=torch.bool, device=labels.device)  # (B, 1)
        return {"context": context, "context_mask": mask}

    def drop(self, inputs: Tensor | Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        """Replace each label by the null label with probability ``dropout_prob``."""
        labels = self._as_labels(inputs, allow_null=False)  # (B,)
        drop = dropout_mask(labels.shape[0], self.dropout_prob, generator).to(labels.device)  # (B,)
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)

    def null_inputs(self, n: int) -> Tensor:
        """``n`` null labels, the unconditional input for classifier-free guidance."""
        return torch.full((n,), self.null_label, dtype=torch.long, device=self.embedding.weight.device)
