"""Triton kernels (installed as hyperkern.kernels): pure @triton.jit code plus launch helpers.

One file per op family: rank1_linear.py, rank1_conv.py. No autograd here; the custom ops in
hyperkern/ops/_triton_*.py wrap these launchers.
"""
