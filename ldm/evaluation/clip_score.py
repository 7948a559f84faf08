"""CLIP score: text-image agreement of generated images with their prompts (Hessel et al. 2021, without w =
2.5).

score = 100 * max(cos(E_img(image), E_txt(prompt)), 0) per image, with any ``transformers.CLIPModel`` given as
a local directory or hub id (its own ``CLIPProcessor``: resize, crop and normalisation as the model was
trained; captions truncated to the model's context length). Mean over images is what eval.py reports, as
torchmetrics' ``CLIPScore`` does.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ldm.evaluation.inception import to_uint8_levels

log = logging.getLogger(__name__)


class ClipScorer:
    """``scorer(images (B, 3, H, W) in [0, 1], prompts) -> (B,)`` CLIP scores in [0, 100]."""

    def __init__(self, model: str, device: str | torch.device = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(model).to(torch.device(device)).eval()
            self.processor = CLIPProcessor.from_pretrained(model)
        except OSError as err:
            first = (str(err).strip().splitlines() or [""])[0][:160]
            raise OSError(
                f"clip_model={model!r} does not load ({first}): pass a local CLIP directory (CLIPModel + "
                "CLIPProcessor files) or a hub id that is in the cache, or clip_model=null to skip the CLIP "
                "score"
            ) from None
        self.name = model
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor:
        if len(prompts) != len(images):
            raise ValueError(
                f"got {len(images)} images but {len(prompts)} prompts: give one prompt per image"
            )
        pixels = to_uint8_levels(images).permute(0, 2, 3, 1).cpu().numpy().astype(np.uint8)  # (B, H, W, 3)
        inputs = self.processor(
            text=list(prompts),
            images=list(pixels),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.max_length,
        )
        out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
        cos = F.cosine_similarity(out.image_embeds.float(), out.text_embeds.float(), dim=-1)  # (B,)
        return 100.0 * cos.clamp(min=0).cpu()
