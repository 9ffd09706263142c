"""Built-in data sets and models of the experiment runner (kinds added by
:mod:`kfqn.runner.registry`)."""
from __future__ import annotations

from kfqn.core.hookspecs import hookimpl


@hookimpl
def kfqn_datasets() -> list:
    """CURVES (generated), digits (scikit-learn), MNIST, Fashion-MNIST, CIFAR-10/100, SVHN."""
    from kfqn.runner.data import DATASETS

    return list(DATASETS)


@hookimpl
def kfqn_models() -> list:
    """P2's autoencoders, scaled-down autoencoders, All-CNN-C, VGG16(-BN), ResNet-32, digits CNN."""
    from kfqn.runner.models import MODELS

    return list(MODELS)
