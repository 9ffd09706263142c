"""Data augmentation in torch, seeded: random crop with zero padding and horizontal flip.

Runs on whole batches (on any device) from its own :class:`torch.Generator`, so a run is
reproducible and its augmentation stream is saved in checkpoints.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

#: names accepted by ``data.augment`` besides true/false
AUGMENTATIONS = ("crop_flip",)


class CropFlip:
    """Random ``pad``-pixel-padded crop back to the input size, then a flip with prob. 1/2.

    Applied to scaled images (N, C, H, W) before standardisation, so the padding is black,
    as in torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``.
    """

    def __init__(self, seed: int, pad: int = 4, flip: bool = True) -> None:
        self.pad = pad
        self.flip = flip
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.pad
        if p > 0:
            dy = torch.randint(0, 2 * p + 1, (n,), generator=self.generator).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=self.generator).to(x.device)
            xp = F.pad(x, (p, p, p, p))
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (N, H, 1)
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, W)
            idx = torch.arange(n, device=x.device)[:, None, None]
            x = xp.permute(0, 2, 3, 1)[idx, rows, cols].permute(0, 3, 1, 2)  # (N, C, H, W)
        if self.flip:
            mask = torch.rand(n, generator=self.generator).to(x.device) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(-1), x)
        return x.contiguous()

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def make_augmentation(setting: Any, default: Optional[str], seed: int) -> Optional[CropFlip]:
    """The augmentation for ``data.augment`` (null: the data set's default; true/false; a name)."""
    name = default if setting is None else (default or "crop_flip") if setting is True else setting
    if name in (None, False):
        return None
    if name == "crop_flip":
        return CropFlip(seed)
    from kfqn.core.errors import ConfigError

    raise ConfigError(f"data.augment = {setting!r} is not allowed; allowed: null, true, false, "
                      + ", ".join(repr(a) for a in AUGMENTATIONS))
