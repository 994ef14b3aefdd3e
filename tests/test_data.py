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


def test_idx_to_h5_stores_the_statistics_a_streamed_run_needs(tmp_path):
    """The converted file carries the training images' mean and std (no pass over the data at every
    start), equal to those of the IDX files, and is chunked and compressed for streamed reads."""
    make_idx_dir(tmp_path)
    out = tmp_path / "fm.h5"
    assert idx2h5_main([str(tmp_path), str(out)]) == 0
    expected = data.load_idx_dir(tmp_path).train
    with h5py.File(out, "r") as f:
        assert (f.attrs["mean"], f.attrs["std"]) == (expected.mean, expected.std)
        assert f["images"].chunks is not None and f["images"].compression is not None


def write_images(directory, classes=("cat", "dog", "emu"), per_class=6, size=(10, 8), mode="RGB"):
    """Class folders of PNG images with known pixels; returns {pixels bytes: label}."""
    Image = pytest.importorskip("PIL.Image", reason="mpipar-images2h5 needs the images extra (Pillow)")

    rng, known = np.random.default_rng(3), {}
    for label, name in enumerate(classes):
        (directory / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(directory / name / f"{i}.png")
            known[(pixels.transpose(2, 0, 1) if mode == "RGB" else pixels[None]).tobytes()] = label
    return known


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_images_to_h5_round_trip(tmp_path, mode):
    from mpipar.data.images2h5 import main

    known = write_images(tmp_path / "in", mode=mode)
    out = tmp_path / "img.h5"
    assert main([str(tmp_path / "in"), str(out), "--test-fraction", "0.34"]) == 0
    splits = data.load_h5(out, cache=False)
    assert len(splits.train) == 12 and len(splits.test) == 6  # 2 of each class's 6 held out
    assert splits.model_shape == {"in_channels": 3 if mode == "RGB" else 1, "num_classes": 3, "image_size": 8}
    seen = {}
    for split in (splits.train, splits.test):
        images, labels = split.samples(np.arange(len(split)))
        seen.update({image.numpy().tobytes(): int(label) for image, label in zip(images, labels)})
    assert seen == known  # every image once, with its class's label
    with h5py.File(out, "r") as f:
        assert f.attrs["classes"] == '["cat", "dog", "emu"]' and f["images"].chunks is not None
        first = f["images"][...].astype(np.float64) / 255
        assert abs(f.attrs["mean"] - first.mean()) < 1e-6


def test_images_to_h5_refuses_bad_input_clearly(tmp_path):
    from mpipar.data.images2h5 import images_to_h5

    write_images(tmp_path / "in")
    from PIL import Image
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "in" / "dog" / "small.png")
    with pytest.raises(ValueError, match=r"different sizes: .* is 10x8, .*small.png is 5x5; pass --size"):
        images_to_h5(tmp_path / "in", tmp_path / "a.h5")
    images_to_h5(tmp_path / "in", tmp_path / "a.h5", size=6)
    assert data.load_h5(tmp_path / "a.h5").model_shape["image_size"] == 6
    (tmp_path / "in" / "emu" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match=r"broken.jpg: cannot read image"):
        images_to_h5(tmp_path / "in", tmp_path / "b.h5", size=6)
    assert not (tmp_path / "b.h5").exists() and not (tmp_path / "b.h5.tmp").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .jpg/.jpeg/.png images in class folders"):
        images_to_h5(tmp_path / "empty", tmp_path / "c.h5")


def test_text_to_h5_round_trip_and_windows(tmp_path):
    from mpipar.data.sharding import rank_batches
    from mpipar.data.text2h5 import main
    from mpipar.data.tokens import load_tokens

    texts = [f"document {i}: {'héllo wörld ' * (20 + i)}\n" for i in range(10)]
    paths = []
    for i, text in enumerate(texts):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    out = tmp_path / "tok.h5"
    assert main([*map(str, paths), str(out), "--validation-fraction", "0.2"]) == 0
    with h5py.File(out, "r") as f:
        train, validation = f["train/tokens"][...].tobytes(), f["validation/tokens"][...].tobytes()
        assert f["train/tokens"].dtype == np.uint8 and f.attrs["vocab_size"] == 256
    documents = [t.encode("utf-8") for t in texts]
    held = [d for d in documents if d in validation]
    assert len(held) == 2 and validation == b"".join(held)  # whole documents, in order
    assert train == b"".join(d for d in documents if d not in held)
    splits = load_tokens(out, seq_len=16, seed=5)
    windows = splits.train
    assert len(windows) == len(train) // 16 - 1 and splits.vocab_size == 256
    tokens = np.frombuffer(train, np.uint8).astype(np.int64)
    for epoch in (0, 1, 2):
        indices = rank_batches(len(windows), 4, 2, 1, seed=5, epoch=epoch)[0]
        inputs, targets = windows.batch(indices, epoch)
        starts = windows.starts(indices, epoch)
        assert np.array_equal(inputs.numpy(), tokens[starts[:, None] + np.arange(16)])
        assert np.array_equal(targets.numpy(), tokens[starts[:, None] + np.arange(1, 17)])
        again = load_tokens(out, 16, seed=5).train  # a pure function of (seed, epoch): any rank, any run
        assert torch.equal(windows.batch(indices, epoch)[0], again.batch(indices, epoch)[0])
    assert {windows.phase(e) for e in range(8)} != {0}  # the cut moves with the epoch
    assert (windows.starts([len(windows) - 1], 7) + 17 <= len(tokens)).all()


def test_text_to_h5_refuses_bad_input_clearly(tmp_path):
    from mpipar.data.text2h5 import text_to_h5

    good, empty, binary = tmp_path / "good.txt", tmp_path / "empty.txt", tmp_path / "bin.txt"
    good.write_text("some text\n\nmore text\n")
    empty.write_text("  \n\n ")
    binary.write_bytes(b"ok \xff\xfe")
    with pytest.raises(ValueError, match=r"empty.txt: empty text"):
        text_to_h5([good, empty], tmp_path / "a.h5")
    with pytest.raises(ValueError, match=r"bin.txt: not UTF-8 text \(byte 3"):
        text_to_h5([good, binary], tmp_path / "a.h5")
    with pytest.raises(ValueError, match=r"1 document: a split by document needs at least 2"):
        text_to_h5([good], tmp_path / "a.h5")
    text_to_h5([good], tmp_path / "a.h5", separator="\n\n")  # two documents in one file
    assert not (tmp_path / "a.h5.tmp").exists()
