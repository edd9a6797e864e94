"""Held-out evidence for the recipes' choices, never touching a test split.

For each split seed S: the dataset's split S as `hyperkern compare` makes it; its TRAINING split is
cut 80/20 into a development training set and a development validation set (selection, the
hyper-batch distribution steps); the seed's VALIDATION split is the held-out set that scores the
variants. The random search (budget trials on the development sets) gives the tuned setting; then
each variant trains the batch and hyper-batch ensembles from it with --train-seeds seeds, and the
held-out NLL is printed per split and as a mean.

Variants (--variants, comma separated):
  tuned          the tuned recipe: both arms from the search's best setting WITH its label smoothing
  tuned-no-ls    the same without label smoothing on either arm
  reference-init the tuned recipe with the reference's fast weights (0.75 hyper-batch) and
                 linear-scale distributions
  reference-schedule  the tuned recipe with the reference's warm-up and x0.2 steps
  reference      the reference recipe's batch-type arms (range-mean start, no label smoothing,
                 fast weights 0.5 / 0.75, linear-scale intervals, its schedule and Adam rate);
                 the split and the search stay the tuned recipe's, so only the arms differ

    python tools/dev_splits.py --data digits --splits 0 1 2 --train-seeds 0 1 --variants tuned,tuned-no-ls
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch


def _variant(name: str, recipe):
    """(recipe, use label smoothing) of a variant name."""
    from hyperkern.ensembles.recipes import get_recipe

    if name == "tuned":
        return recipe, True
    if name == "tuned-no-ls":
        return recipe, False
    if name == "reference-init":
        return dataclasses.replace(recipe, hyper_fast_init_std_mlp=0.75, init_space="linear"), True
    if name == "reference-schedule":
        return dataclasses.replace(recipe, lr_schedule="reference"), True
    if name == "reference":
        return get_recipe("reference"), False
    raise SystemExit(f"unknown variant {name!r}")


def main(argv=None):
    from hyperkern.data import load_dataset, split_indices
    from hyperkern.ensembles import (BatchEnsembleTrainer, HyperBatchEnsembleTrainer, HyperDeepEnsemble, ModelSpec,
                                     TrainConfig)
    from hyperkern.ensembles.recipes import get_recipe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="mlp")
    p.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", default="tuned,tuned-no-ls")
    p.add_argument("--budget", type=int, default=32)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("-E", "--ensemble-size", type=int, default=4)
    p.add_argument("--output", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    recipe = get_recipe("tuned")
    E = args.ensemble_size
    epochs = args.epochs or (40 if args.data == "digits" else 20)
    config = TrainConfig(epochs=epochs, batch_size=64, lr=0.1, lr_schedule=recipe.lr_schedule)
    results = {}
    for split in args.splits:
        data = load_dataset(args.data, data_dir=args.data_dir, seed=split,
                            val_fraction=recipe.resolved_val_fraction(args.data))
        dev_val_idx, dev_train_idx = split_indices(len(data.train), [0.2], 1000 + split)
        dev_train, dev_val, held_out = data.train.subset(dev_train_idx), data.train.subset(dev_val_idx), data.val
        spec = ModelSpec(args.model, data.num_classes, data.input_shape, {"backend": "auto"})
        t0 = time.perf_counter()
        search = HyperDeepEnsemble(spec, E, budget=args.budget, config=config, seed=split, stratify=False,
                                   progress=False).fit(dev_train, dev_val)
        tuned = dict(min(search.search_trials, key=lambda t: t["val_nll"])["hparams"])
        print(f"split {split}: tuned {json.dumps({k: round(v, 4) for k, v in tuned.items()})} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        for name in args.variants.split(","):
            v_recipe, smoothing_on = _variant(name, recipe)
            v_config = dataclasses.replace(config, lr_schedule=v_recipe.lr_schedule)
            v_hb_config = dataclasses.replace(v_config, hparam_lr=v_recipe.distribution_lr(args.data))
            for seed in args.train_seeds:
                hb_spec = dataclasses.replace(spec, kwargs={**spec.kwargs, "fast_init_std":
                                                            v_recipe.fast_init_std(args.model, "hyper_batch")})
                b_spec = dataclasses.replace(spec, kwargs={**spec.kwargs, "fast_init_std":
                                                           v_recipe.fast_init_std(args.model, "batch")})
                space = hb_spec.build("hyper_batch", E).hparam_space
                batch_hp, init, smoothing = v_recipe.batch_type_start(space, tuned)
                if not smoothing_on:
                    batch_hp, smoothing = {**batch_hp, "label_smoothing": 0.0}, 0.0
                batch = BatchEnsembleTrainer(b_spec, E, hparams=batch_hp, config=v_config, seed=seed,
                                             progress=False).fit(dev_train, dev_val)
                hyper = HyperBatchEnsembleTrainer(hb_spec, E, config=v_hb_config, seed=seed, init_hparams=init,
                                                  init_space=v_recipe.init_space, label_smoothing=smoothing,
                                                  progress=False).fit(dev_train, dev_val)
                for method, trainer in (("batch", batch), ("hyper_batch", hyper)):
                    nll = float(trainer.evaluate(held_out)["nll"])
                    results.setdefault(name, {}).setdefault(method, {}).setdefault(str(split), []).append(nll)
                print(f"  {name:15s} seed {seed}: batch {results[name]['batch'][str(split)][-1]:.4f} "
                      f"hyper-batch {results[name]['hyper_batch'][str(split)][-1]:.4f}", flush=True)
    print("\nheld-out NLL, mean over training seeds (split ...; mean of splits):")
    for name, by_method in results.items():
        for method, by_split in by_method.items():
            means = [sum(v) / len(v) for v in by_split.values()]
            print(f"  {name:15s} {method:12s} " + " ".join(f"{m:.4f}" for m in means)
                  + f"; mean {sum(means) / len(means):.4f}")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
