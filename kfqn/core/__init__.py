"""Core: registry, hook specs, config, assembly and the optimizer."""
