"""Layer preconditioners: one object per layer and method family that owns both factors."""
