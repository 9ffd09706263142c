"""Built-in layer adapters: Linear and Conv2d."""
from kfqn.core.hookspecs import hookimpl
from kfqn.layers.conv2d import Conv2dAdapter
from kfqn.layers.linear import LinearAdapter


@hookimpl
def kfqn_layer_adapters() -> list:
    return [LinearAdapter, Conv2dAdapter]
