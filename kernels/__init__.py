"""Triton kernels of fastrp, installed as ``fastrp.kernels``.

Importing a kernel module imports triton; ``fastrp.ops`` does so lazily, only when a Triton
backend is used, so that fastrp works where triton is not installed.
"""
