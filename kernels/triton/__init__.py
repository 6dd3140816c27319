"""``@triton.jit`` code only; launchers and references live one level up."""
