"""Triton kernels, installed as `cocord_fast.kernels`; this package imports only torch and triton."""
