"""Base class of model components and the losses the papers use."""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kfqn.core.components import Component, Option


def sigmoid_cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sigmoid cross-entropy of logits, summed over pixels, mean over samples (P2 MNIST/CURVES)."""
    target = target.reshape(output.shape)
    return F.binary_cross_entropy_with_logits(output, target, reduction="sum") / output.shape[0]


def half_squared_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Half squared error summed over pixels, mean over samples (P2 FACES)."""
    diff = output - target.reshape(output.shape)
    return 0.5 * (diff * diff).sum() / output.shape[0]


#: reconstruction losses by name (``loss`` option of the autoencoders)
RECONSTRUCTION_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sigmoid_ce": sigmoid_cross_entropy,
    "half_squared": half_squared_error,
}


#: the K-FAC output loss (``preconditioner.loss``, ``loss_reduction``, ``mse_scale`` of the
#: ``kfac`` preconditioner) that equals each training loss above, so that the Fisher is the right one
FISHER_LOSSES: dict[str, dict[str, Any]] = {
    "cross_entropy": {"loss": "cross_entropy", "loss_reduction": "batch"},
    "sigmoid_ce": {"loss": "sigmoid_cross_entropy", "loss_reduction": "batch"},
    "half_squared": {"loss": "mse", "loss_reduction": "batch", "mse_scale": 0.5},
}


def width_option(doc: str = "multiplier of every hidden width (small values for quick tests)"):
    """The ``width`` option shared by the models."""
    return Option(1.0, doc, float, low=0.0, open_low=True)


def scaled(n: int, width: float) -> int:
    """``n`` hidden units times ``width``, at least 1."""
    return max(1, int(round(n * width)))


class ModelComponent(Component):
    """Base class of model components (registry kind ``model``).

    ``task`` is ``"classification"`` (cross-entropy on labels; test accuracy is reported) or
    ``"reconstruction"`` (an autoencoder; the target is the input itself). Subclasses implement
    :meth:`build` and, for reconstruction, choose the loss through :meth:`loss`.
    """

    task: ClassVar[str] = "classification"

    def build(self, input_shape: tuple[int, ...], num_classes: Optional[int],
              **options: Any) -> nn.Module:
        """The model for inputs of ``input_shape`` (C, H, W) and ``num_classes`` outputs."""
        raise NotImplementedError

    def loss(self, output: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
             **options: Any) -> torch.Tensor:
        """The training loss, mean over the batch, without any L2 term."""
        if self.task == "reconstruction":
            return RECONSTRUCTION_LOSSES[options.get("loss", "sigmoid_ce")](output, x)
        return F.cross_entropy(output, y)

    def loss_name(self, **options: Any) -> str:
        """The name of the training loss :meth:`loss` computes (a key of FISHER_LOSSES)."""
        if self.task == "reconstruction":
            return options.get("loss", getattr(self, "default_loss", "sigmoid_ce"))
        return "cross_entropy"

    def fisher_loss(self, **options: Any) -> Optional[dict[str, Any]]:
        """The K-FAC G-side loss settings equal to this model's training loss (None: unknown;
        a model with another loss overrides this)."""
        return FISHER_LOSSES.get(self.loss_name(**options))

    def correct(self, output: torch.Tensor, y: torch.Tensor) -> int:
        """Number of correctly classified samples (classification models)."""
        return int((output.argmax(dim=1) == y).sum())

    @staticmethod
    def need_classes(name: str, num_classes: Optional[int]) -> int:
        if not num_classes:
            from kfqn.core.errors import ConfigError

            raise ConfigError(f"model {name!r} is a classifier but the data set has no labels; "
                              "use a classification data set (digits, mnist, cifar10, ...)")
        return int(num_classes)
