"""Layer adapters: from a module's inputs, outputs and gradients to Kronecker-factor quantities."""
from kfqn.layers.base import LayerAdapter
from kfqn.layers.capture import Capture, CaptureHooks
from kfqn.layers.conv2d import Conv2dAdapter
from kfqn.layers.linear import LinearAdapter

__all__ = ["LayerAdapter", "Capture", "CaptureHooks", "LinearAdapter", "Conv2dAdapter"]
