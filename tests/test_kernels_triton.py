"""The op contracts (tests/kernel_test_base.py) on the Pallas Triton backend (interpret mode on CPU)."""
import warnings

import jax.numpy as jnp
import pytest

from kernel_test_base import KernelOpTests

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
warnings.filterwarnings("ignore", category=DeprecationWarning)


class TestTritonFloat32(KernelOpTests):
    impl = "triton"
    dtype = jnp.float32


class TestTritonBfloat16(KernelOpTests):
    impl = "triton"
    dtype = jnp.bfloat16
