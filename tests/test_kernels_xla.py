"""The op contracts (tests/kernel_test_base.py) on the XLA reference backend."""
import jax.numpy as jnp

from kernel_test_base import KernelOpTests


class TestXlaFloat32(KernelOpTests):
    impl = "xla"
    dtype = jnp.float32


class TestXlaBfloat16(KernelOpTests):
    impl = "xla"
    dtype = jnp.bfloat16
