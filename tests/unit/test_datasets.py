"""Datasets: the digits built-in, the idx parser, idx directories, .npz files, statistics."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from deepscope.models.datasets import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ENV,
    Dataset,
    channel_stats,
    class_averages,
    class_indices,
    load_dataset,
    read_idx,
)

_CODES = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}


def write_idx(path: Path, array: np.ndarray, *, magic: bytes | None = None) -> Path:
    """Write ``array`` as an idx file (gzipped when ``path`` ends in .gz)."""
    big = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    header = magic if magic is not None else bytes([0, 0, _CODES[big.dtype], array.ndim])
    raw = header + struct.pack(f">{array.ndim}I", *array.shape) + big.tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# -- digits -----------------------------------------------------------------------------------


def test_digits_shapes_and_range() -> None:
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape == (1437, 1, 28, 28)
    assert train.input_shape == (1, 28, 28)
    assert train.images.dtype == torch.float32
    assert train.labels.dtype == torch.int64
    assert float(train.images.min()) >= 0.0
    assert float(train.images.max()) == pytest.approx(1.0, abs=1e-6)
    assert train.class_names == tuple(str(i) for i in range(10))
    assert train.num_classes == 10


def test_digits_split_disjoint_and_stratified() -> None:
    from sklearn.datasets import load_digits

    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    train_rows = {row.numpy().tobytes() for row in train.images.flatten(1)}
    test_rows = {row.numpy().tobytes() for row in test.images.flatten(1)}
    # The 1797 digits are all distinct images, so disjoint splits share no image.
    assert not train_rows & test_rows
    assert len(train_rows | test_rows) == 1797
    full = np.bincount(load_digits().target, minlength=10)
    test_counts = np.bincount(test.labels.numpy(), minlength=10)
    train_counts = np.bincount(train.labels.numpy(), minlength=10)
    np.testing.assert_array_equal(train_counts + test_counts, full)
    # Stratified: every class is 20 % held out, up to rounding.
    assert np.all(np.abs(test_counts - 0.2 * full) <= 1.0)


def test_digits_cached_and_deterministic() -> None:
    from deepscope.models.datasets import _load_cached

    first = load_dataset("digits", "test")
    assert load_dataset("digits", "test") is first
    _load_cached.cache_clear()
    again = load_dataset("digits", "test")
    assert again is not first
    torch.testing.assert_close(again.images, first.images, rtol=0, atol=0)
    assert torch.equal(again.labels, first.labels)


def test_unknown_dataset_and_split() -> None:
    with pytest.raises(ValueError, match=r"digits, fashion-mnist"):
        load_dataset("no-such-dataset")
    with pytest.raises(ValueError, match="unknown split"):
        load_dataset("digits", "valid")  # type: ignore[arg-type]


# -- the idx parser ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path: Path, suffix: str) -> None:
    images = rng().integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / f"i{suffix}", images)), images)
    ints = np.array([1, -2, 300000], dtype=np.int32)
    out = read_idx(write_idx(tmp_path / f"n{suffix}", ints))
    np.testing.assert_array_equal(out, ints)
    assert out.dtype == np.int32  # native byte order after parsing
    floats = np.array([[0.5, 0.25]], dtype=np.float32)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / f"f{suffix}", floats)), floats)


def test_read_idx_errors(tmp_path: Path) -> None:
    data = np.zeros((2, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(write_idx(tmp_path / "a", data, magic=bytes([1, 2, 8, 2])))
    with pytest.raises(ValueError, match="data type code 0x07"):
        read_idx(write_idx(tmp_path / "b", data, magic=bytes([0, 0, 7, 2])))
    path = write_idx(tmp_path / "c", data)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="idx header says"):
        read_idx(path)
    (tmp_path / "d.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read idx file"):
        read_idx(tmp_path / "d.gz")


def make_idx_dir(root: Path, *, test_top: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """train (plain, ``-idx3-`` spelling) labels 0..2; t10k (gzipped, ``.idx3-``) 0..test_top."""
    root.mkdir()
    g = rng()
    train_images = g.integers(0, 256, size=(6, 5, 4), dtype=np.uint8)
    train_labels = np.array([0, 1, 2, 0, 1, 2], dtype=np.uint8)
    write_idx(root / "train-images-idx3-ubyte", train_images)
    write_idx(root / "train-labels-idx1-ubyte", train_labels)
    write_idx(root / "t10k-images.idx3-ubyte.gz", train_images[:2])
    write_idx(root / "t10k-labels.idx1-ubyte.gz", np.array([1, test_top], dtype=np.uint8))
    return train_images, train_labels


def test_idx_directory(tmp_path: Path) -> None:
    images, labels = make_idx_dir(tmp_path / "mnistlike")
    train = load_dataset(str(tmp_path / "mnistlike"), "train")
    assert train.images.shape == (6, 1, 5, 4)
    np.testing.assert_allclose(train.images[:, 0].numpy(), images / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(train.labels.numpy(), labels)
    # The class count covers both splits (label 3 only occurs in the test split).
    assert train.class_names == ("0", "1", "2", "3")
    test = load_dataset(str(tmp_path / "mnistlike"), "test")
    assert len(test) == 2
    assert test.class_names == train.class_names


def test_idx_directory_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an MNIST-format directory"):
        load_dataset(str(tmp_path))


def test_idx_directory_length_mismatch(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    make_idx_dir(root)
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="6 images but 5 labels"):
        load_dataset(str(root))


# -- fashion-mnist ----------------------------------------------------------------------------


def test_fashion_mnist_missing_dir_explains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="dataset-fashion-mnist") as info:
        load_dataset("fashion-mnist")
    assert FASHION_MNIST_ENV in str(info.value)
    assert "nowhere" in str(info.value)


def test_fashion_mnist_env_and_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_idx_dir(tmp_path / "fm")
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "fm"))
    ds = load_dataset("fashion-mnist", "train")
    assert ds.name == "fashion-mnist"
    assert ds.class_names == FASHION_MNIST_CLASSES
    assert len(ds) == 6
    monkeypatch.delenv(FASHION_MNIST_ENV)
    assert len(load_dataset("fashion-mnist", "test", fashion_mnist_dir=tmp_path / "fm")) == 2


def test_fashion_mnist_rejects_out_of_range_labels(tmp_path: Path) -> None:
    make_idx_dir(tmp_path / "fm", test_top=10)
    with pytest.raises(ValueError, match=r"expected 0\.\.9"):
        load_dataset("fashion-mnist", fashion_mnist_dir=tmp_path / "fm")


@pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist absent")
def test_fashion_mnist_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)
    test = load_dataset("fashion-mnist", "test")
    assert test.images.shape == (10_000, 1, 28, 28)
    assert test.class_names == FASHION_MNIST_CLASSES
    assert np.bincount(test.labels.numpy()).tolist() == [1000] * 10
    assert float(test.images.min()) >= 0.0
    assert float(test.images.max()) <= 1.0


# -- .npz -------------------------------------------------------------------------------------


def save_npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return str(path)


def test_npz_uint8_hw(tmp_path: Path) -> None:
    images = rng().integers(0, 256, size=(4, 6, 6), dtype=np.uint8)
    path = save_npz(tmp_path / "a.npz", images=images, labels=np.array([0, 1, 1, 0]))
    train = load_dataset(path, "train")
    assert train.images.shape == (4, 1, 6, 6)
    np.testing.assert_allclose(train.images[:, 0].numpy(), images / 255.0, atol=1e-7)
    assert train.class_names == ("0", "1")
    assert train.name == "a"
    # Without *_test arrays the file serves both splits.
    test = load_dataset(path, "test")
    assert torch.equal(test.images, train.images)


def test_npz_float_nchw_with_test_split_and_names(tmp_path: Path) -> None:
    g = rng()
    path = save_npz(
        tmp_path / "b.npz",
        images=g.random((3, 3, 4, 4)),
        labels=np.array([0, 1, 0], dtype=np.int16),
        images_test=g.random((2, 3, 4, 4)).astype(np.float32),
        labels_test=np.array([2, 1]),
        class_names=np.array(["cat", "dog", "owl"]),
    )
    train = load_dataset(path, "train")
    test = load_dataset(path, "test")
    assert train.images.shape == (3, 3, 4, 4)
    assert train.images.dtype == torch.float32
    assert test.images.shape == (2, 3, 4, 4)
    assert test.labels.tolist() == [2, 1]
    assert train.class_names == test.class_names == ("cat", "dog", "owl")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"labels": np.zeros(2, dtype=np.int64)}, "missing key 'images'"),
        ({"images": np.zeros((2, 4, 4), np.uint8)}, "missing key 'labels'"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(3, int)}, "2 images"),
        ({"images": np.zeros((2, 16), np.uint8), "labels": np.zeros(2, int)}, "(N, H, W)"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros((2, 1), int)}, "1-d"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(2)}, "must be integers"),
        ({"images": np.full((2, 4, 4), 1.5), "labels": np.zeros(2, int)}, r"\[0, 1\]"),
        ({"images": np.full((2, 4, 4), np.nan), "labels": np.zeros(2, int)}, "NaN"),
        ({"images": np.zeros((2, 4, 4), np.int32), "labels": np.zeros(2, int)}, "uint8"),
        ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.array([0, -1])}, "non-negative"),
        (
            {
                "images": np.zeros((2, 4, 4), np.uint8),
                "labels": np.array([0, 2]),
                "class_names": np.array(["a", "b"]),
            },
            "2 class_names but labels go up to 2",
        ),
        (
            {
                "images": np.zeros((2, 4, 4), np.uint8),
                "labels": np.zeros(2, int),
                "images_test": np.zeros((1, 4, 4), np.uint8),
            },
            "must come together",
        ),
    ],
)
def test_npz_errors(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset(path)
    assert "\n" not in str(info.value)


def test_npz_object_arrays_refused(tmp_path: Path) -> None:
    path = save_npz(
        tmp_path / "obj.npz",
        images=np.zeros((1, 2, 2), np.uint8),
        labels=np.zeros(1, int),
        class_names=np.array(["a", None], dtype=object),
    )
    with pytest.raises(ValueError, match="without pickle"):
        load_dataset(path)


def test_not_an_npz(tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        load_dataset(str(tmp_path / "x.npz"))
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"\.npz"):
        load_dataset(str(tmp_path / "x.csv"))


def test_rewritten_file_is_reloaded(tmp_path: Path) -> None:
    import os

    path = tmp_path / "c.npz"
    save_npz(path, images=np.zeros((2, 2, 2), np.uint8), labels=np.zeros(2, int))
    assert len(load_dataset(str(path))) == 2
    save_npz(path, images=np.zeros((3, 2, 2), np.uint8), labels=np.zeros(3, int))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert len(load_dataset(str(path))) == 3


# -- statistics -------------------------------------------------------------------------------


def tiny() -> Dataset:
    images = torch.tensor(
        [
            [[[0.0, 1.0]], [[0.5, 0.5]]],
            [[[1.0, 1.0]], [[0.5, 0.5]]],
            [[[0.2, 0.4]], [[0.5, 0.5]]],
        ]
    )  # (3, 2, 1, 2): channel 1 constant
    return Dataset("tiny", images, torch.tensor([0, 0, 2]), ("a", "b", "c"))


def test_class_indices_and_averages() -> None:
    ds = tiny()
    idx = class_indices(ds)
    assert [t.tolist() for t in idx] == [[0, 1], [], [2]]
    averages = class_averages(ds)
    assert averages.shape == (3, 2, 1, 2)
    torch.testing.assert_close(averages[0, 0], torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(averages[1], torch.zeros(2, 1, 2))  # no samples
    torch.testing.assert_close(averages[2], ds.images[2])


def test_channel_stats() -> None:
    mean, std = channel_stats(tiny())
    values = np.array([0.0, 1.0, 1.0, 1.0, 0.2, 0.4])
    assert mean == pytest.approx([values.mean(), 0.5])
    # Population std; a constant channel gets 1.0 so it is a valid normalization.
    assert std == pytest.approx([values.std(), 1.0])


def test_channel_stats_digits() -> None:
    ds = load_dataset("digits")
    mean, std = channel_stats(ds)
    assert mean[0] == pytest.approx(float(ds.images.double().mean()), rel=1e-9)
    assert std[0] == pytest.approx(float(ds.images.double().std(correction=0)), rel=1e-9)


def test_png_is_a_one_image_dataset(tmp_path: Path) -> None:
    from PIL import Image

    gray = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    ds = load_dataset(str(tmp_path / "g.png"))
    assert ds.images.shape == (1, 1, 28, 28)
    assert torch.allclose(ds.images[0, 0], torch.from_numpy(gray).float() / 255)
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[..., 1] = 255
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "c.png")
    ds = load_dataset(str(tmp_path / "c.png"))
    assert ds.images.shape == (1, 3, 20, 30)
    assert float(ds.images[0, 1].min()) == 1.0
    assert float(ds.images[0, 0].max()) == 0.0
    (tmp_path / "fake.png").write_bytes(b"GIF89a not a png")
    with pytest.raises(ValueError, match=r"fake\.png"):
        load_dataset(str(tmp_path / "fake.png"))
