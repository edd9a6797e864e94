"""One linear op's forward + backward in a loop of its own process, for tools that measure a whole process
(`perf stat -e page-faults`, `perf record`, allocator settings such as GLIBC_TUNABLES): the hp op at
E = 4, B = 256, in = out = 512 as a bench/ops.py variant ("cpp", "cpp tied", "cpp tied, weight step"),
or the floor (F.linear to 2*out outputs). Prints the process CPU time per step; run it with 0 steps
for the start-up cost to subtract.

    python -m bench.linear_step "cpp tied, weight step" 100 [--threads 1]
    perf stat -e page-faults python -m bench.linear_step floor 100
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bench.ops import _VARIANT_INPUTS, _linear_inputs

VARIANTS = ("floor", "cpp", *_VARIANT_INPUTS)


def make_step(variant: str, E: int = 4, B: int = 256, fin: int = 512, fout: int = 512):
    """A closure running one forward + backward of variant (gradients accumulate in the inputs' .grad);
    its inputs are on its `inputs` attribute."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "floor":
        x, w, b = (torch.randn(*shape, requires_grad=True) for shape in ((E * B, fin), (2 * fout, fin), (2 * fout,)))

        def floor_step():
            y = F.linear(x, w, b)
            y.backward(torch.ones_like(y))
        floor_step.inputs = (x, w, b)
        return floor_step

    from hyperkern.ops._cpp_linear import hyper_batch_ensemble_linear_hp

    op = "hyper_batch_ensemble_linear_hp"
    args = _VARIANT_INPUTS.get(variant, _linear_inputs)(op, E, B, fin, fout, torch.float32, torch.device("cpu"), True)

    def op_step():
        y = hyper_batch_ensemble_linear_hp(*args)
        y.backward(torch.ones_like(y))
    op_step.inputs = tuple(a for a in args if a is not None)
    return op_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("steps", type=int)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.steps < 0:
        parser.error(f"steps must be >= 0, got {args.steps}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    step = make_step(args.variant)
    for _ in range(3 if args.steps else 0):
        step()
    t0 = time.process_time()
    for _ in range(args.steps):
        step()
    per_step = (time.process_time() - t0) / args.steps * 1e3 if args.steps else 0.0
    print(f"{args.variant}: {per_step:.2f} ms/step (process CPU time, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
