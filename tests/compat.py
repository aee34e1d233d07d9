"""What the tests need from JAX across the tested stacks (jax 0.7.2 on Colab to the newest)."""

import jax


def enable_x64(enabled: bool = True):
    """Context manager: float64 inside (``jax.enable_x64`` in newer jax; before it,
    ``jax.experimental.enable_x64``)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(enabled)
    from jax.experimental import enable_x64 as experimental_enable_x64
    return experimental_enable_x64(enabled)
