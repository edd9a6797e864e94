"""Triton kernels (installed as hyperkern.kernels): pure @triton.jit code plus launch helpers.

One file per op family: rank1_linear.py, rank1_conv.py. No autograd here; the custom ops in
hyperkern/ops/_triton_*.py wrap these launchers.
"""
import os

# Whether triton runs in its interpreter: triton reads the variable when the kernels are defined,
# i.e. when these modules are imported, so it is read once here too.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def refuse_interpreted_bfloat16(*tensors):
    """The interpreter's bfloat16 tl.dot is wrong (an upstream Triton bug: the rank-1 ops came out off
    by 1e10 relative); its float16, float32 and float64 dots are right. Rather than return garbage,
    the launchers refuse bfloat16 there with this error."""
    if INTERPRETING and any(t is not None and str(t.dtype) == "torch.bfloat16" for t in tensors):
        raise TypeError("backend='triton' cannot run bfloat16 in Triton's interpreter (TRITON_INTERPRET=1): the "
                        "interpreter's bfloat16 tl.dot gives wrong results (an upstream bug). Use float16, float32 "
                        "or float64 there, backend='cpp' or 'torch' for bfloat16 on the CPU, or a GPU, where the "
                        "compiled kernels run bfloat16")


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
