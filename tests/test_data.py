import gzip
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from hyperkern import data
from hyperkern.data import DataFileError


# ---------------------------------------------------------------------------------------------
# writers of the real on-disk formats

def write_idx(path, array, gz=False):
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}
    array = np.asarray(array)
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + (".gz" if gz else ""), "wb") as f:
        f.write(gzip.compress(payload) if gz else payload)


class _Py2StylePickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the CIFAR batches: bytes as BINSTRING opcodes and
    numpy's reconstructor under its old module name numpy.core.multiarray."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None)
        if module == "numpy._core.multiarray":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + (name or obj.__name__).encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch[type(len)] = save_global


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def make_mnist(root, folder="MNIST", n_train=30, n_test=12, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, folder, "raw")
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images, gz)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels, gz)
        arrays[prefix] = (images, labels)
    return arrays


def make_cifar10(root, per_batch=8, style="py2", seed=0):
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    dump = py2_pickle if style == "py2" else (lambda o: pickle.dumps(o, protocol=2))
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": images,
                 b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        with open(os.path.join(folder, name), "wb") as f:
            f.write(dump(batch))
        batches[name] = (images, labels)
    return batches


def make_cifar100(root, n=10, seed=0):
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    out = {}
    for name in ("train", "test"):
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        batch = {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(), b"fine_labels": fine,
                 b"coarse_labels": [v // 5 for v in fine], b"data": images}
        with open(os.path.join(folder, name), "wb") as f:
            f.write(py2_pickle(batch))
        out[name] = (images, fine)
    return out


# ---------------------------------------------------------------------------------------------

def test_digits_embedded_splits_fixed_by_seed():
    a = data.load_digits(seed=0)
    b = data.load_digits(seed=0)
    c = data.load_digits(seed=1)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert (len(a.test), len(a.val)) == (359, 180)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert a.train.x.shape == (len(a.train), 1, 8, 8) and a.train.x.dtype == torch.float32
    assert float(a.train.x.min()) == 0.0 and float(a.train.x.max()) == 1.0
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.test.y, c.test.y)
    # the three splits partition the 1,797 images: their label histograms add up to the file's
    counts = sum(torch.bincount(ds.y, minlength=10) for ds in (a.train, a.val, a.test))
    assert counts.tolist() == np.bincount(data._digits_array()[:, 64]).tolist()
    pixel_sums = sorted(ds.x.sum().item() for ds in (a.train, a.val, a.test))
    assert sum(pixel_sums) == pytest.approx(float(data._digits_array()[:, :64].sum()) / 16, rel=1e-6)


def test_digits_known_first_row():
    table = data._digits_array()
    assert table[0, :8].tolist() == [0, 0, 5, 13, 9, 1, 0, 0] and table[0, 64] == 0
    assert np.bincount(table[:, 64]).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_roundtrip(tmp_path, gz):
    arrays = make_mnist(str(tmp_path), gz=gz)
    splits = data.load_mnist(tmp_path, seed=3, val_fraction=0.2)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 12)
    assert splits.input_shape == (1, 28, 28)
    test_images, test_labels = arrays["t10k"]
    assert torch.equal(splits.test.y, torch.from_numpy(test_labels.astype(np.int64)))
    assert torch.allclose(splits.test.x[:, 0], torch.from_numpy(test_images.astype(np.float32) / 255))
    # train + val is the official training set, nothing lost
    train_images, train_labels = arrays["train"]
    got = torch.cat([splits.train.x, splits.val.x]).flatten(1).mul(255).round().to(torch.uint8)
    assert sorted(map(bytes, got.numpy())) == sorted(map(bytes, train_images.reshape(30, -1)))


def test_fashion_mnist_layout_and_load_dataset(tmp_path):
    make_mnist(str(tmp_path), folder="FashionMNIST", seed=5)
    splits = data.load_dataset("fashion-mnist", data_dir=tmp_path)
    assert splits.name == "fashion_mnist" and len(splits.test) == 12


def test_read_idx_other_dtypes(tmp_path):
    arr = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 7
    write_idx(str(tmp_path / "a" / "x-idx"), arr)
    out = data.read_idx(str(tmp_path / "a" / "x-idx"))
    assert out.dtype == np.int32 and np.array_equal(out, arr)
    f = np.linspace(-1, 1, 5).astype(np.float64)
    write_idx(str(tmp_path / "a" / "f-idx"), f, gz=True)
    assert np.array_equal(data.read_idx(str(tmp_path / "a" / "f-idx.gz")), f)


def test_missing_and_corrupt_idx_files_name_the_path(tmp_path):
    with pytest.raises(DataFileError, match=r"MNIST/raw/train-images-idx3-ubyte"):
        data.load_mnist(tmp_path)
    make_mnist(str(tmp_path))
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    raw = path.read_bytes()
    path.write_bytes(raw[:-5])  # truncated
    with pytest.raises(DataFileError, match=f"{path}.*announces shape \\(30, 28, 28\\)"):
        data.load_mnist(tmp_path)
    path.write_bytes(b"\x12\x34" + raw[2:])  # bad magic
    with pytest.raises(DataFileError, match=f"{path}: bad IDX magic"):
        data.load_mnist(tmp_path)
    path.write_bytes(b"\x1f\x8b garbage")  # claims gzip, is not
    with pytest.raises(DataFileError, match=f"{path}: corrupt gzip"):
        data.load_mnist(tmp_path)
    # labels file with the wrong count
    make_mnist(str(tmp_path))
    write_idx(str(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"), np.zeros(29, np.uint8))
    with pytest.raises(DataFileError, match="holds 30 images but .* holds 29 labels"):
        data.load_mnist(tmp_path)
    with pytest.raises(ValueError, match="data_dir is required"):
        data.load_mnist(None)
    with pytest.raises(DataFileError, match="data directory not found"):
        data.load_mnist(tmp_path / "nope")


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_cifar10_batches(tmp_path, style):
    batches = make_cifar10(str(tmp_path), style=style)
    splits = data.load_cifar10(tmp_path, seed=0, val_fraction=0.25)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 8)
    assert splits.input_shape == (3, 32, 32) and splits.num_classes == 10
    images, labels = batches["test_batch"]
    assert splits.test.y.tolist() == labels
    # undo the per-channel normalisation: the raw uint8 pixels come back exactly, channel-first
    mean = torch.tensor(data._CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data._CIFAR10_STD).view(1, 3, 1, 1)
    pixels = ((splits.test.x * std + mean) * 255).round().to(torch.uint8)
    assert torch.equal(pixels, torch.from_numpy(images.reshape(-1, 3, 32, 32)))


def test_cifar100_fine_labels(tmp_path):
    out = make_cifar100(str(tmp_path))
    splits = data.load_dataset("cifar100", data_dir=tmp_path, val_fraction=0.2)
    assert splits.num_classes == 100 and splits.test.y.tolist() == out["test"][1]
    assert len(splits.train) == 8 and len(splits.val) == 2


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(DataFileError, match="cifar-10-batches-py/data_batch_1"):
        data.load_cifar10(tmp_path)
    make_cifar10(str(tmp_path))
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataFileError, match=f"{path}: refused or unreadable pickle"):
        data.load_cifar10(tmp_path)
    path.write_bytes(py2_pickle({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataFileError, match=f"{path}: 'data' is ndarray \\(2, 100\\)"):
        data.load_cifar10(tmp_path)
    path.write_bytes(py2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}))
    with pytest.raises(DataFileError, match="expected 2 integer labels"):
        data.load_cifar10(tmp_path)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("payload", [_RunsCode, _EvalCode])
def test_hostile_cifar_pickle_is_refused_and_runs_nothing(tmp_path, payload):
    make_cifar10(str(tmp_path))
    marker = tmp_path / "PWNED"
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    evil = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"filenames": payload(str(marker))}
    path.write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataFileError, match=f"{path}: refused.*is not allowed"):
        data.load_cifar10(tmp_path)
    assert not marker.exists()
    # the same payload really would run under plain pickle: the test would notice a leaky filter
    pickle.loads(path.read_bytes())
    assert marker.exists()


def test_restricted_unpickle_refuses_object_arrays():
    blob = pickle.dumps(np.array([1, "a"], dtype=object), protocol=2)
    with pytest.raises(DataFileError, match="object dtype|not allowed"):
        data.restricted_unpickle(blob)


def test_split_indices_partition():
    parts = data.split_indices(100, [0.2, 0.1], seed=7)
    assert [len(p) for p in parts] == [20, 10, 70]
    assert sorted(torch.cat(parts).tolist()) == list(range(100))
    assert all(torch.equal(a, b) for a, b in zip(parts, data.split_indices(100, [0.2, 0.1], seed=7)))
    with pytest.raises(ValueError, match="val_fraction"):
        data.load_digits(val_fraction=1.5)
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load_dataset("imagenet")


# ---------------------------------------------------------------------------------------------
# hostile and corrupt files: refused with the path named, in bounded time and memory

def _idx_header(shape, code=0x08):
    return bytes([0, 0, code, len(shape)]) + b"".join(struct.pack(">I", d) for d in shape)


def test_idx_item_count_overflowing_int64_names_the_file(tmp_path):
    shape = (11806113, 409891, 7623851)  # the product is 1 modulo 2**64
    assert int(np.prod(shape, dtype=np.int64)) == 1
    for gz in (False, True):
        path = tmp_path / f"overflow{gz}-idx"
        blob = _idx_header(shape) + bytes(1)  # what the wrapped count would accept
        path.write_bytes(gzip.compress(blob) if gz else blob)
        with pytest.raises(DataFileError, match=f"{path}: IDX header announces shape \\(11806113, 409891, 7623851\\)"):
            data.read_idx(str(path))


def test_corrupt_gzip_idx_is_a_data_file_error_naming_the_path(tmp_path):
    make_mnist(str(tmp_path), gz=True)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    path.write_bytes(bytes.fromhex("1f8b0800") + bytes(range(256)) * 4)  # a gzip header, then garbage
    with pytest.raises(DataFileError, match=f"{path}: corrupt gzip stream"):
        data.read_idx(str(path))
    path.write_bytes(gzip.compress(path.read_bytes())[:-12])  # truncated
    with pytest.raises(DataFileError, match=f"{path}"):
        data.load_mnist(tmp_path)


def test_compare_with_a_corrupt_gzip_idx_exits_2_with_one_line(tmp_path, capsys):
    from hyperkern.cli import main

    make_mnist(str(tmp_path), gz=True)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    path.write_bytes(bytes.fromhex("1f8b0800") + bytes(range(256)) * 4)
    code = main(["compare", "--data", "mnist", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and f"{path}: corrupt gzip stream" in err and "Traceback" not in err


def test_gzip_idx_is_inflated_only_up_to_the_announced_size(tmp_path, monkeypatch):
    """1 MB of gzip inflating to 300 MB behind a header announcing 10 items: refused having inflated
    at most the announced size (plus one byte), never the whole stream."""
    import zlib

    from hyperkern.data import _formats

    co = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    blob = co.compress(_idx_header((10,))) + b"".join(co.compress(bytes(1 << 20)) for _ in range(300)) + co.flush()
    path = tmp_path / "bomb-idx.gz"
    path.write_bytes(blob)
    inflated = []
    real = zlib.decompressobj

    class Counting:
        def __init__(self, *args):
            self._d = real(*args)

        def decompress(self, data, max_length=0):
            out = self._d.decompress(data, max_length)
            inflated.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self._d, name)

    monkeypatch.setattr(_formats.zlib, "decompressobj", Counting)
    monkeypatch.setattr(gzip, "decompress", lambda *a, **k: pytest.fail("inflated the whole stream"))
    with pytest.raises(DataFileError, match=f"{path}: IDX header announces shape \\(10,\\).*holds more"):
        data.read_idx(str(path))
    assert sum(inflated) <= 4 + 4 + 10 + 1
    # a multi-member gzip file (gzip allows several) still reads, in pieces of any size
    images = np.arange(6 * 28 * 28, dtype=np.uint8).reshape(6, 28, 28)
    raw = _idx_header(images.shape) + images.tobytes()
    path.write_bytes(gzip.compress(raw[:7]) + gzip.compress(raw[7:1000]) + gzip.compress(raw[1000:]))
    assert np.array_equal(data.read_idx(str(path)), images)


def _shared_nested_lists(width, depth=7):
    """Nested lists in which each level holds `width` references to ONE child: a few hundred bytes
    of pickle (memo references), width**depth leaves as a tree."""
    obj = 0
    for _ in range(depth):
        obj = [obj] * width
    return obj


@pytest.mark.parametrize("width", [8, 40])
def test_restricted_unpickle_refuses_a_memo_bomb_in_linear_time(tmp_path, width):
    bomb = _shared_nested_lists(width)
    blob = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": bomb}, protocol=2)
    assert len(blob) < 7000
    make_cifar10(str(tmp_path))
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(blob)
    # width 40 is 40**7 = 1.6e11 leaves: walked as a tree it would never finish
    with pytest.raises(DataFileError, match=f"{path}: refused.*expands to more than"):
        data.load_cifar10(tmp_path)


def test_restricted_unpickle_bounds_depth_and_refuses_cycles():
    deep = []
    for _ in range(12):
        deep = [deep]
    with pytest.raises(DataFileError, match="more than 8 deep"):
        data.restricted_unpickle(pickle.dumps(deep, protocol=2))
    loop = []
    loop.append(loop)
    with pytest.raises(DataFileError, match="contains itself|more than 8 deep"):
        data.restricted_unpickle(pickle.dumps(loop, protocol=2))
    # a shared child reached at two depths: its height counts at the deeper one
    child = [[[[[1]]]]]  # its leaf lies 5 levels down
    ok = [child, [[child]]]  # deepest leaf at depth 3 + 5 = 8
    assert data.restricted_unpickle(pickle.dumps(ok, protocol=2)) == ok
    with pytest.raises(DataFileError, match="more than 8 deep"):
        data.restricted_unpickle(pickle.dumps([child, [[[child]]]], protocol=2))
