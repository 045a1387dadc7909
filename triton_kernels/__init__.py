"""Triton kernels of kelix_fast, installed as kelix_fast.triton_kernels.

One op per file; imports torch and triton only, never kelix_fast.
"""
