"""The test extra: kfqn.testing needs pytest and hypothesis, kfqn itself does not."""
from __future__ import annotations

try:
    import hypothesis  # noqa: F401
    import pytest  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"kfqn.testing needs pytest and hypothesis ({exc.name} is missing): "
                      "pip install kfqn[test]") from None
