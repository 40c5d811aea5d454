"""Execution backends beside the fake-quant bank: real-kernel banks whose step latency is what a deployment sees."""

from qsched_search.backends.torchao_backend import (KernelChoice, RealKernelBank, kernel_for, real_kernel_levels,
                                                    register_kernel, tensor_bytes)

__all__ = ["KernelChoice", "RealKernelBank", "kernel_for", "real_kernel_levels", "register_kernel", "tensor_bytes"]
