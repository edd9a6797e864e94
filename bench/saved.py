"""Activations a training forward keeps for its backward: the MLP's batch and hyper-batch variants.

    python -m bench.saved                 # MLP 784-200-200-10, E = 4 x 256 rows, train mode
    (also printed by python -m bench --suite models)

Counts the bytes of every distinct storage autograd saves during one forward (a saved_tensors_hooks
pack hook), the model's parameters excluded and the input included (both variants keep it), so the
number is what the backward holds on to, whatever op saved it. Target (issue 15): the hyper-batch MLP
keeps at most 1.6x the batch MLP's activations.
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench.common import MIB, format_target

TARGET = 1.6


def saved_bytes(model: torch.nn.Module, *inputs) -> int:
    """Bytes of the distinct storages autograd saves while model(*inputs) runs, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return sum(seen.values())


def mlp_rows(E: int = 4, B: int = 256, seed: int = 0) -> list[dict]:
    """[{variant, saved_mib, x_batch}] for the MLP's batch and hyper_batch variants in train mode."""
    from hyperkern.models import mlp

    rows = []
    for variant in ("batch", "hyper_batch"):
        torch.manual_seed(seed)
        model = mlp(10, 784, variant=variant, ensemble_size=E).train()
        x = torch.randn(E * B, 784)
        inputs = (x, torch.rand(E * B, model.hparam_space.num_hparams)) if variant == "hyper_batch" else (x,)
        rows.append({"model": "mlp 784-200-200-10", "variant": variant, "rows": E * B,
                     "saved_mib": saved_bytes(model, *inputs) / MIB})
    for r in rows:
        r["x_batch"] = r["saved_mib"] / rows[0]["saved_mib"]
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| model | variant | rows | saved for backward, MiB | x batch |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['variant']} | {r['rows']} | {r['saved_mib']:.2f} | {r['x_batch']:.2f} |"
              for r in rows]
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[dict]:
    hyper = next(r for r in rows if r["variant"] == "hyper_batch")
    return [{"target": f"{hyper['model']} saved activations: hyper_batch <= {TARGET}x batch",
             "value": f"{hyper['x_batch']:.2f}x", "ok": hyper["x_batch"] <= TARGET}]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.saved", description=__doc__.splitlines()[0])
    p.add_argument("--ensemble-size", "-E", type=int, default=4)
    p.add_argument("--per-member", "-B", type=int, default=256)
    args = p.parse_args(argv)
    if args.ensemble_size < 1 or args.per_member < 1:
        p.error("--ensemble-size and --per-member must be >= 1")
    rows = mlp_rows(args.ensemble_size, args.per_member)
    print(format_rows(rows))
    for t in check_targets(rows):
        print(format_target(t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
