"""Dataset readers on small files the tests write, and the synthetic source."""

import gzip
import struct

import h5py
import numpy as np
import pytest
import torch

from mpipar import data
from mpipar.data.convert import main as idx2h5_main


def write_idx(path, array, gz):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    (gzip.open if gz else open)(path, "wb").write(payload)


def make_idx_dir(tmp_path, n_train=30, n_test=10, gz=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    sets = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 6, 5), dtype=np.uint8)
        labels = rng.integers(0, 4, n).astype(np.uint8)
        write_idx(tmp_path / f"{split}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte{suffix}", labels, gz)
        sets[split] = (images, labels)
    return sets


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_round_trip(tmp_path, gz):
    sets = make_idx_dir(tmp_path, gz=gz)
    splits = data.load_idx_dir(tmp_path)
    assert splits.train.images.shape == (30, 1, 6, 5)
    assert np.array_equal(splits.train.images[:, 0].numpy(), sets["train"][0])
    assert np.array_equal(splits.test.labels.numpy(), sets["t10k"][1])
    images, labels = splits.train.batch([2, 0])
    assert images.dtype == torch.float32 and labels.tolist() == [sets["train"][1][2], sets["train"][1][0]]


def test_truncated_and_corrupt_idx_files_are_clear_errors(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(path)
    path.write_bytes(b"garbage!")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(path)
    gz = tmp_path / "x.gz"
    gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 100) + b"\x01" * 100)[:-10])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        data.read_idx(gz)


def test_images_and_labels_of_different_lengths(tmp_path):
    make_idx_dir(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(29, np.uint8), gz=False)
    with pytest.raises(ValueError, match="30 images but .* 29 labels"):
        data.load_idx_dir(tmp_path)


def test_idx_to_h5_converter_and_h5_reader(tmp_path):
    sets = make_idx_dir(tmp_path)
    out = tmp_path / "fm.h5"
    assert idx2h5_main([str(tmp_path), str(out)]) == 0
    splits = data.resolve(str(out))
    assert np.array_equal(splits.train.images[:, 0].numpy(), sets["train"][0])
    assert np.array_equal(splits.test.labels.numpy(), sets["t10k"][1])
    assert idx2h5_main([str(tmp_path / "missing"), str(tmp_path / "x.h5")]) == 1


def test_h5_without_test_split_holds_out_and_bad_h5_errors(tmp_path):
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["images"] = np.zeros((70, 4, 4), np.uint8)
        f["labels"] = np.arange(70) % 3
    splits = data.load_h5(path)
    assert len(splits.train) + len(splits.test) == 70 and "held out" in splits.description
    with h5py.File(path, "w") as f:
        f["images"] = np.zeros((70, 4, 4), np.uint8)
        f["labels"] = np.arange(69) % 3
    with pytest.raises(ValueError, match="70 images but 69 labels"):
        data.load_h5(path)
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(ValueError, match="corrupt"):
        data.load_h5(path)


def test_resolve_missing_dataset_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*--data synthetic"):
        data.resolve("fashion-mnist", search_dirs=(str(tmp_path),))
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.resolve(str(tmp_path / "nope.h5"))


def test_synthetic_is_deterministic_and_learnable():
    a, b = data.synthetic(600, 200, seed=4), data.synthetic(600, 200, seed=4)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, data.synthetic(600, 200, seed=5).train.images)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    images, labels = a.train.batch(np.arange(600))
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
    test_images, test_labels = a.test.batch(np.arange(200))
    accuracy = (model(test_images).argmax(1) == test_labels).float().mean().item()
    assert accuracy > 0.6, f"a linear model reached only {accuracy:.2f} on synthetic data (chance 0.1)"
