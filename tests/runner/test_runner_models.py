"""Model components: the papers' architectures, their losses, width multipliers, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfqn.core.errors import ConfigError
from kfqn.runner.components import resolve_options
from kfqn.runner.models import MODELS
from kfqn.runner.models.autoencoders import (
    CurvesAutoencoder,
    DigitsAutoencoder,
    FacesAutoencoder,
    MnistAutoencoder,
)
from kfqn.runner.models.cnns import AllCnnC, DigitsCnn, ResNet32, Vgg16, Vgg16Bn


def build(cls, shape, classes=10, **options):
    comp = cls()
    return comp, comp.build(shape, classes, **resolve_options(comp, options, "model.options"))


def linear_sizes(model):
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("cls,shape,sizes", [
    (MnistAutoencoder, (1, 28, 28), [784, 1000, 500, 250, 30, 250, 500, 1000, 784]),
    (FacesAutoencoder, (1, 25, 25), [625, 2000, 1000, 500, 30, 500, 1000, 2000, 625]),
    (CurvesAutoencoder, (1, 28, 28), [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784]),
])
def test_paper_autoencoder_architectures(cls, shape, sizes):
    _, model = build(cls, shape)
    assert linear_sizes(model) == list(zip(sizes[:-1], sizes[1:]))
    # ReLU after every hidden layer, none after the code layer nor the output layer
    layers = list(model.encoder) + list(model.decoder)
    acts = [isinstance(b, nn.ReLU) for a, b in zip(layers, layers[1:] + [None])
            if isinstance(a, nn.Linear)]
    code = len(sizes) // 2 - 1
    assert acts == [i not in (code, len(sizes) - 2) for i in range(len(sizes) - 1)]


def test_width_multiplier_scales_hidden_layers_only():
    _, model = build(CurvesAutoencoder, (1, 28, 28), width=0.5)
    sizes = [s for s, _ in linear_sizes(model)] + [784]
    assert sizes == [784, 200, 100, 50, 25, 12, 6, 12, 25, 50, 100, 200, 784]


def test_autoencoder_losses_follow_the_paper():
    x = torch.rand(5, 1, 28, 28)
    comp, model = build(CurvesAutoencoder, (1, 28, 28))
    out = model(x)
    manual = -(x.flatten(1) * F.logsigmoid(out) + (1 - x.flatten(1)) * F.logsigmoid(-out))
    torch.testing.assert_close(comp.loss(out, x, None), manual.sum(1).mean())
    comp, model = build(FacesAutoencoder, (1, 25, 25))
    x = torch.rand(3, 1, 25, 25)
    out = model(x)
    torch.testing.assert_close(comp.loss(out, x, None, loss="half_squared"),
                               0.5 * ((out - x.flatten(1)) ** 2).sum(1).mean())


def test_autoencoder_input_size_mismatch_is_explained():
    with pytest.raises(ConfigError, match="expects 784 input features.*gives 64.*digits_autoencoder"):
        build(MnistAutoencoder, (1, 8, 8))


@pytest.mark.parametrize("cls,shape,options", [
    (AllCnnC, (3, 16, 16), {"width": 0.1}),
    (Vgg16, (3, 16, 16), {"width": 0.05}),
    (Vgg16Bn, (3, 32, 32), {"width": 0.05}),
    (ResNet32, (3, 8, 8), {"width": 0.25, "blocks": 1}),
    (ResNet32, (3, 8, 8), {"width": 0.25, "blocks": 1, "shortcut": "B"}),
    (DigitsCnn, (1, 8, 8), {}),
    (DigitsAutoencoder, (1, 8, 8), {}),
])
def test_models_run_and_use_only_preconditionable_modules(cls, shape, options):
    comp, model = build(cls, shape, classes=7, **options)
    x = torch.rand(2, *shape)
    out = model(x)
    if comp.task == "classification":
        assert out.shape == (2, 7)
        loss = comp.loss(out, x, torch.tensor([0, 6]))
    else:
        loss = comp.loss(out, x, None)
    loss.backward()
    for m in model.modules():
        if list(m.parameters(recurse=False)):  # every parameter sits in a supported layer
            assert isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d)), type(m)
        if isinstance(m, nn.Conv2d):
            assert m.groups == 1
        if isinstance(m, nn.ReLU):
            assert not m.inplace  # a hooked layer output must not be overwritten


def test_full_size_parameter_counts():
    assert sum(p.numel() for p in build(ResNet32, (3, 32, 32))[1].parameters()) == 464154
    assert sum(p.numel() for p in build(Vgg16, (3, 32, 32))[1].parameters()) == 14719818


def test_classifier_needs_labels():
    with pytest.raises(ConfigError, match="classifier"):
        build(DigitsCnn, (1, 8, 8), classes=None)


def test_every_model_is_registered_with_a_description():
    from kfqn.core.registry import default_registry

    names = default_registry().names("model")
    for cls in MODELS:
        assert cls.name in names and cls.description
    assert {"mnist_autoencoder", "faces_autoencoder", "curves_autoencoder", "allcnn_c", "vgg16",
            "vgg16_bn", "resnet32", "digits_cnn", "digits_autoencoder"} <= set(names)
    datasets = default_registry().names("dataset")
    assert {"curves", "digits", "mnist", "fashion_mnist", "cifar10", "cifar100",
            "svhn"} <= set(datasets)


def test_unknown_option_is_named_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"model.options.widht is not an option of "
                                          r"'digits_cnn'; its options: width. Did you mean"):
        resolve_options(DigitsCnn(), {"widht": 2}, "model.options")
    with pytest.raises(ConfigError, match="model.options.width"):
        resolve_options(DigitsCnn(), {"width": -1.0}, "model.options")
