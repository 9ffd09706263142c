"""The deep autoencoders of P2 (Hinton & Salakhutdinov's benchmarks) and scaled-down ones.

ReLU hidden layers, a linear code layer and a linear output layer whose outputs are logits for
the sigmoid cross-entropy losses (MNIST, CURVES) or reconstructions for the squared error
(FACES). The decoder mirrors the encoder.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import nn

from kfqn.core.components import Option
from kfqn.core.errors import ConfigError
from kfqn.runner.models.base import RECONSTRUCTION_LOSSES, ModelComponent, scaled, width_option


class MLPAutoencoder(nn.Module):
    """``in -> hidden... -> code -> reversed(hidden)... -> in``; input images are flattened.

    Layers are plain ``nn.Linear`` with ``nn.ReLU`` between them (none after the code layer
    and the output layer), so the Kronecker-factored optimizers precondition every layer.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], code: int,
                 init: str = "xavier") -> None:
        super().__init__()
        sizes = [in_features, *hidden, code]
        self.encoder = self._stack(sizes, last_relu=False)
        self.decoder = self._stack(sizes[::-1], last_relu=False)
        if init == "xavier":
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)

    @staticmethod
    def _stack(sizes: Sequence[int], last_relu: bool) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2 or last_relu:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x.flatten(1)))


class _AutoencoderComponent(ModelComponent):
    """Common options and the input-size check of the autoencoders."""

    task = "reconstruction"
    #: input features the architecture is defined for (None: taken from the data)
    in_features: ClassVar[Optional[int]] = None
    hidden: ClassVar[Sequence[int]] = ()
    code: ClassVar[int] = 30
    default_loss: ClassVar[str] = "sigmoid_ce"
    data_hint: ClassVar[str] = ""

    @classmethod
    def _options(cls) -> dict[str, Option]:
        return {
            "width": width_option("multiplier of the hidden widths (not of the code layer)"),
            "code": Option(cls.code, "size of the linear code layer", int, low=1),
            "loss": Option(cls.default_loss, "reconstruction loss",
                           choices=tuple(RECONSTRUCTION_LOSSES)),
            "init": Option("xavier", "weight initialisation: Glorot-uniform weights and zero "
                           "biases, or PyTorch's default", choices=("xavier", "torch")),
        }

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "options" not in cls.__dict__:
            cls.options = cls._options()

    def build(self, input_shape, num_classes, **options):
        n_in = math.prod(input_shape)
        if self.in_features is not None and n_in != self.in_features:
            raise ConfigError(
                f"model {self.name!r} expects {self.in_features} input features"
                f"{self.data_hint}; data set gives {n_in} ({'x'.join(map(str, input_shape))}). "
                "Pick a model for this data (e.g. digits_autoencoder for 8x8 digits, "
                "mlp_autoencoder for any size)."
            )
        hidden = [scaled(h, options["width"]) for h in self._hidden(options)]
        return MLPAutoencoder(n_in, hidden, options["code"], options["init"])

    def _hidden(self, options: dict) -> Sequence[int]:
        return self.hidden

    def loss(self, output, x, y, **options):
        return RECONSTRUCTION_LOSSES[options.get("loss", self.default_loss)](output, x)


class MnistAutoencoder(_AutoencoderComponent):
    """P2's MNIST autoencoder 784-1000-500-250-30-250-500-1000-784, sigmoid cross-entropy."""

    name = "mnist_autoencoder"
    description = "P2 MNIST autoencoder 784-1000-500-250-30-...-784, sigmoid cross-entropy"
    in_features, hidden, code = 784, (1000, 500, 250), 30
    data_hint = " (1x28x28 images: mnist, fashion_mnist, curves)"


class FacesAutoencoder(_AutoencoderComponent):
    """P2's FACES autoencoder 625-2000-1000-500-30-500-1000-2000-625, half squared error."""

    name = "faces_autoencoder"
    description = "P2 FACES autoencoder 625-2000-1000-500-30-...-625, half squared error"
    in_features, hidden, code = 625, (2000, 1000, 500), 30
    default_loss = "half_squared"
    data_hint = " (25x25 images)"


class CurvesAutoencoder(_AutoencoderComponent):
    """P2's CURVES autoencoder 784-400-200-100-50-25-6-...-784, sigmoid cross-entropy."""

    name = "curves_autoencoder"
    description = "P2 CURVES autoencoder 784-400-200-100-50-25-6-...-784, sigmoid cross-entropy"
    in_features, hidden, code = 784, (400, 200, 100, 50, 25), 6
    data_hint = " (1x28x28 images: curves, mnist, fashion_mnist)"


class DigitsAutoencoder(_AutoencoderComponent):
    """A scaled-down MNIST autoencoder for 8x8 digits: 64-128-64-32-8-32-64-128-64."""

    name = "digits_autoencoder"
    description = "scaled-down autoencoder for 8x8 digits 64-128-64-32-8-...-64, sigmoid CE"
    in_features, hidden, code = 64, (128, 64, 32), 8
    data_hint = " (1x8x8 images: digits)"


class GenericAutoencoder(_AutoencoderComponent):
    """An autoencoder with configurable hidden widths for any input size."""

    name = "mlp_autoencoder"
    description = "autoencoder with configurable hidden widths for any input size"

    @classmethod
    def _options(cls) -> dict[str, Option]:
        return {**super()._options(),
                "hidden": Option([256, 64], "encoder hidden widths (the decoder mirrors them)",
                                 list)}

    def _hidden(self, options: dict) -> Sequence[int]:
        hidden = options["hidden"]
        if not all(isinstance(h, int) and h > 0 for h in hidden):
            raise ConfigError(f"model.options.hidden = {hidden!r}: expected a list of positive "
                              "integers, e.g. [256, 64]")
        return hidden


AUTOENCODERS = [MnistAutoencoder, FacesAutoencoder, CurvesAutoencoder, DigitsAutoencoder,
                GenericAutoencoder]
