"""Make the golden fixtures of tests/test_nn_loaders.py from the REAL edward2 layers.

Run once, in a separate venv with TensorFlow (hyperkern's tests then need numpy and torch only):

    python3 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu==2.19.1 tf-keras==2.19.0 edward2==0.0.2 \
        tensorflow-probability==0.25.0
    /tmp/tfvenv/bin/python tools/make_edward2_fixtures.py            # writes tests/fixtures/edward2/*.npz

(edward2 0.0.2 imports tensorflow_probability; without it `import edward2` fails. The script sets
TF_USE_LEGACY_KERAS=1 so tf.keras is tf-keras 2.19, the Keras 2 edward2 is written for. It uses numpy
and TensorFlow only: no torch in this process.)

For every case it builds one edward2 layer (DenseBatchEnsemble, Conv2DBatchEnsemble,
DenseHyperBatchEnsemble or Conv2DHyperBatchEnsemble), gives every weight random non-trivial values
(fast weights N(1, 0.5^2), nonzero biases, delta kernels and delta biases), and for the hyper layers
an e-model as the reference's e_factory builds it by default (uncertainty-baselines
wide_resnet_hyperbatchensemble.e_factory with e_body_arch=e_shared_arch=() and use_bias=False: one
linear Dense(e_dim, use_bias=False) on the log-scaled lambdas, e_dim = units without a bias and
2 * units with one). It runs the layer forward on member-major rows and backward under a fixed random
upstream gradient g, and saves (one .npz per case):

    config        JSON: the layer's arguments, hyperparameter ranges, lambda_key_to_index, versions
    w{i}          layer.get_weights()[i], in Keras order; w_names: the weights' .name, in that order;
                  w_ckpt_keys: each weight's key in tf.train.Checkpoint(layer=layer) (distinct paths,
                  e.g. layer/conv2d/kernel and layer/delta_conv2d/kernel, whose .name are both c/c/kernel:0)
    e_kernel      the e-model's only weight, (num_hparams, e_dim) (hyper layers)
    x, g          the input (NHWC for conv) and the upstream gradient (the output's shape)
    lambdas, z    (E*B, m) original-scale lambdas and the e-model's input (log-scaled into [0, 1])
    y             the layer's output
    grad_x, grad_w{i}, grad_e   d sum(y * g) / d (x, w_i, e_kernel)
    penalty       the hyper layer's add_loss term (its mean L2 regulariser), with
                  regularize_fast_weights=False (the reference); pgrad_w{i}, pgrad_e: its gradients
                  (zeros where TensorFlow returns None)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import edward2 as ed  # noqa: E402

B = 2  # examples per member
IN, OUT = 5, 3  # dense
CIN, COUT = 2, 3  # conv
RANGES = [(1e-3, 10.0), (1e-2, 1e2), (0.1, 100.0)]  # m = 3 log-scaled hyperparameters
NAME = "hyper"
KEY_TO_INDEX = {f"{NAME}_l2_kernel": 2, f"{NAME}_l2_bias": 0}  # column 1 is used by no L2 term here


def _cases():
    c = []
    for E, bias in ((1, True), (3, False), (4, True)):
        c.append(dict(kind="dense", E=E, bias=bias))
    conv = [  # (E, stride, padding, H, W, kernel, dilation, bias)
        (1, 1, "same", 7, 7, 3, 1, True),
        (3, 2, "same", 8, 8, 3, 1, True),     # even size at stride 2: TF pads (0, 1)
        (4, 2, "same", 7, 7, 3, 1, False),    # odd size at stride 2: (1, 1)
        (3, 2, "same", 8, 7, 3, 1, True),     # (0, 1) rows, (1, 1) columns
        (3, 1, "same", 6, 6, 2, 1, True),     # even kernel at stride 1: (0, 1)
        (4, 2, "same", 6, 6, 1, 1, False),    # 1x1 at stride 2: no padding
        (3, 1, "same", 7, 8, 3, 2, True),     # dilation 2
        (3, 1, "valid", 6, 6, 3, 1, False),
        (4, 2, "valid", 8, 7, 3, 1, True),
    ]
    for E, s, p, H, W, k, d, bias in conv:
        c.append(dict(kind="conv", E=E, stride=s, padding=p, H=H, W=W, k=k, dilation=d, bias=bias))
    for E, bias, tied in ((1, True, True), (3, True, False), (4, False, True), (3, False, False)):
        c.append(dict(kind="hyper_dense", E=E, bias=bias, tied=tied))
    hconv = [  # (E, stride, padding, H, W, kernel, bias, tied)
        (1, 1, "same", 7, 7, 3, True, True),
        (3, 2, "same", 8, 8, 3, True, False),
        (4, 2, "same", 7, 7, 3, False, True),
        (3, 2, "same", 8, 8, 3, False, False),
        (4, 1, "valid", 6, 6, 3, True, False),
        (3, 2, "same", 8, 6, 1, False, True),  # the WRN shortcut: 1x1 at stride 2
    ]
    for E, s, p, H, W, k, bias, tied in hconv:
        c.append(dict(kind="hyper_conv", E=E, stride=s, padding=p, H=H, W=W, k=k, dilation=1, bias=bias, tied=tied))
    return c


def _case_name(c):
    n = f"{c['kind']}_E{c['E']}"
    if "conv" in c["kind"]:
        n += f"_k{c['k']}_s{c['stride']}_{c['padding']}_{c['H']}x{c['W']}"
        if c.get("dilation", 1) != 1:
            n += f"_d{c['dilation']}"
    n += "_bias" if c["bias"] else "_nobias"
    if "hyper" in c["kind"]:
        n += "_tied" if c["tied"] else "_untied"
    return n


def _build(c):
    kind, E = c["kind"], c["E"]
    if kind == "dense":
        return ed.layers.DenseBatchEnsemble(OUT, ensemble_size=E, use_bias=c["bias"], name=NAME)
    if kind == "conv":
        return ed.layers.Conv2DBatchEnsemble(COUT, c["k"], ensemble_size=E, strides=c["stride"], padding=c["padding"],
                                             dilation_rate=c["dilation"], use_bias=c["bias"], name=NAME)
    common = dict(ensemble_size=E, use_bias=c["bias"], regularize_fast_weights=False,
                  fast_weights_eq_contraint=c["tied"], name=NAME)
    if kind == "hyper_dense":
        return ed.layers.DenseHyperBatchEnsemble(OUT, KEY_TO_INDEX, **common)
    # (Conv2DHyperBatchEnsemble takes no dilation_rate)
    return ed.layers.Conv2DHyperBatchEnsemble(KEY_TO_INDEX, COUT, c["k"], strides=c["stride"], padding=c["padding"],
                                              **common)


def _e_model(units: int, bias: bool):
    """The reference's default e-model: e_factory(..., e_body_arch=(), e_shared_arch=(), use_bias=False)."""
    inp = tf.keras.layers.Input(shape=(len(RANGES),))
    out = tf.keras.layers.Dense(units * (2 if bias else 1), name="dense_e_0_0", activation="linear",
                                use_bias=False)(inp)
    return tf.keras.models.Model(inputs=inp, outputs=out)


def _log_scale(lambdas):
    """The reference's LogScaler: (log lam - log min) / (log max - log min)."""
    lo = tf.math.log(tf.constant([[r[0] for r in RANGES]], tf.float32))
    hi = tf.math.log(tf.constant([[r[1] for r in RANGES]], tf.float32))
    return (tf.math.log(lambdas) - lo) / (hi - lo)


def _randomise(variables, rng):
    for v in variables:
        short = v.name.split(":")[0].rsplit("/", 1)[-1]
        if short.startswith(("alpha", "gamma")):
            value = rng.normal(1.0, 0.5, v.shape)  # fast weights: not 1, some of them negative
        else:
            value = rng.normal(0.0, 0.5, v.shape)  # kernels, delta kernels, biases, delta biases
        v.assign(value.astype(np.float32))


def _ckpt_keys(layer, weights):
    """Each weight's key in tf.train.Checkpoint(layer=layer), matched by value (the values are random)."""
    with tempfile.TemporaryDirectory() as d:
        path = tf.train.Checkpoint(layer=layer).write(os.path.join(d, "ckpt"))
        reader = tf.train.load_checkpoint(path)
        table = {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
                 if k.startswith("layer/") and k.endswith("/.ATTRIBUTES/VARIABLE_VALUE")}
    keys = []
    for w in weights:
        hits = [k for k, t in table.items() if t.shape == tuple(w.shape) and np.array_equal(t, w.numpy())]
        if len(hits) != 1:
            raise RuntimeError(f"cannot match {w.name} to one checkpoint key: {hits}")
        keys.append(hits[0])
    return keys


def make(c, seed: int):
    rng = np.random.default_rng(seed)
    tf.random.set_seed(seed)
    E, kind, hyper = c["E"], c["kind"], c["kind"].startswith("hyper")
    units = OUT if kind.endswith("dense") else COUT
    if kind.endswith("dense"):
        x = rng.standard_normal((E * B, IN)).astype(np.float32)
    else:
        x = rng.standard_normal((E * B, c["H"], c["W"], CIN)).astype(np.float32)
    log_lo, log_hi = np.log([r[0] for r in RANGES]), np.log([r[1] for r in RANGES])
    lambdas = np.exp(log_lo + rng.uniform(0.02, 0.98, (E * B, len(RANGES))) * (log_hi - log_lo)).astype(np.float32)
    layer = _build(c)
    e_model = _e_model(units, c["bias"]) if hyper else None
    xt, lt = tf.constant(x), tf.constant(lambdas)
    z = _log_scale(lt)
    layer([xt, lt, e_model(z)] if hyper else xt)  # build
    _randomise(layer.weights, rng)
    if hyper:
        e_model.layers[-1].kernel.assign(rng.normal(0.0, 0.7, e_model.layers[-1].kernel.shape).astype(np.float32))
    weights = list(layer.weights)
    e_vars = list(e_model.weights) if hyper else []
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        y = layer([xt, lt, e_model(z)] if hyper else xt)
        g = tf.constant(rng.standard_normal(tuple(y.shape)).astype(np.float32))
        obj = tf.reduce_sum(y * g)
        penalty = tf.add_n(layer.losses) if hyper else None
    grads = tape.gradient(obj, [xt] + weights + e_vars)
    out = {"x": x, "g": g.numpy(), "y": y.numpy(), "lambdas": lambdas, "z": z.numpy(), "grad_x": grads[0].numpy()}
    for i, (w, gw) in enumerate(zip(weights, grads[1:1 + len(weights)])):
        out[f"w{i}"] = w.numpy()
        out[f"grad_w{i}"] = np.zeros(w.shape, np.float32) if gw is None else gw.numpy()
    out["w_names"] = np.array([w.name for w in weights])
    out["w_ckpt_keys"] = np.array(_ckpt_keys(layer, weights))
    if hyper:
        if len(e_vars) != 1:
            raise RuntimeError(f"the e-model must hold one kernel, got {[v.name for v in e_vars]}")
        out["e_kernel"] = e_vars[0].numpy()
        out["grad_e"] = grads[-1].numpy()
        if len(layer.losses) != 1:
            raise RuntimeError(f"expected one add_loss term, got {len(layer.losses)}")
        out["penalty"] = np.asarray(penalty.numpy(), np.float32)
        pgrads = tape.gradient(penalty, weights + e_vars)
        for i, (w, gw) in enumerate(zip(weights, pgrads)):
            out[f"pgrad_w{i}"] = np.zeros(w.shape, np.float32) if gw is None else gw.numpy()
        out["pgrad_e"] = pgrads[-1].numpy()
    config = dict(c, B=B, seed=seed, layer_class=type(layer).__name__, name=NAME,
                  units=units, in_features=IN if kind.endswith("dense") else CIN,
                  ranges=RANGES if hyper else None, lambda_key_to_index=KEY_TO_INDEX if hyper else None,
                  regularize_fast_weights=False if hyper else None,
                  versions={"edward2": ed.__version__, "tensorflow": tf.__version__,
                            "tf_keras": _tf_keras_version(), "tensorflow_probability": _tfp_version(),
                            "numpy": np.__version__})
    out["config"] = np.array(json.dumps(config, sort_keys=True))
    return out


def _tfp_version():
    import tensorflow_probability as tfp

    return tfp.__version__


def _tf_keras_version():
    import tf_keras

    return tf_keras.__version__


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "edward2"))
    args = parser.parse_args()
    if not tf.keras.layers.Dense.__module__.startswith("tf_keras"):
        raise SystemExit(f"tf.keras is {tf.keras.__name__}, not tf-keras: set TF_USE_LEGACY_KERAS=1 before TensorFlow")
    os.makedirs(args.out, exist_ok=True)
    total = 0
    for seed, c in enumerate(_cases()):
        name = _case_name(c)
        path = os.path.join(args.out, name + ".npz")
        np.savez_compressed(path, **make(c, seed))
        total += os.path.getsize(path)
        print(f"{name}: {os.path.getsize(path)} bytes")
    print(f"{len(_cases())} fixtures, {total} bytes in {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
