"""Triton kernels (installed as hyperkern.kernels): pure @triton.jit code plus launch helpers.

One file per op family: rank1_linear.py, rank1_conv.py. No autograd here; the custom ops in
hyperkern/ops/_triton_*.py wrap these launchers.
"""


def zero_present(names):
    """An autotuner pre_hook that zeroes the output buffers `names` before each timed launch, skipping
    the ones passed as None. Triton's own reset_to_zero calls .zero_() on every name and fails on an
    absent optional output (e.g. the bias gradient of a layer without bias)."""
    names = tuple(names)

    def pre_hook(kwargs, reset_only=False):
        for name in names:
            if kwargs.get(name) is not None:
                kwargs[name].zero_()

    return pre_hook
