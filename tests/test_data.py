"""Datasets: offline loaders, local TFDS builders, fail-fast for absent TFDS data, batches, augmentation."""

from __future__ import annotations

import io
import random
import shutil
import tarfile
import time

import numpy as np
import pytest

from mclandscape.engine import data, tfds_local
from mclandscape.engine.batches import augment_batch, iterate_batches, num_batches
from mclandscape.engine.data import Dataset, DatasetNotFoundError, load_dataset

OFFLINE = {  # name: (train shape, test shape, classes)
    "digits": ((1437, 8, 8, 1), (360, 8, 8, 1), 10),
    "iris": ((120, 4), (30, 4), 3),
    "wine": ((142, 13), (36, 13), 3),
    "breast_cancer": ((455, 30), (114, 30), 2),
    "mnist1d": ((4000, 40), (1000, 40), 10),
}


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_offline_loaders_shapes_dtypes_and_classes(name):
    tr_shape, te_shape, k = OFFLINE[name]
    data._CACHE.pop(("raw", name), None)  # generated here, so mnist1d's generator runs under the check below
    np.random.seed(7)
    random.seed(7)
    expected_np, expected_py = np.random.get_state()[1].copy(), random.getstate()
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    # mnist1d's generator seeds NumPy's and Python's global generators: the caller's state is left alone
    np.testing.assert_array_equal(np.random.get_state()[1], expected_np)
    assert random.getstate() == expected_py
    assert train.x.shape == tr_shape and test.x.shape == te_shape
    assert train.x.dtype == np.float32 and train.y.dtype == np.int32
    assert train.num_classes == test.num_classes == k and train.name == name
    assert set(np.unique(train.y)) == set(range(k)) and set(np.unique(test.y)) <= set(range(k))
    assert np.all(np.isfinite(train.x)) and len(train) == tr_shape[0]


def test_splits_are_fixed_and_disjoint():
    a, b = load_dataset("digits", "test"), load_dataset("digits", "test", seed=123)
    np.testing.assert_array_equal(a.x, b.x)
    train = load_dataset("digits", "train", normalize=False)
    test = load_dataset("digits", "test", normalize=False)
    rows = {r.tobytes() for r in train.x.reshape(len(train), -1)}
    overlap = sum(r.tobytes() in rows for r in test.x.reshape(len(test), -1))
    assert overlap < 5  # digits holds a few duplicate images; the split itself is disjoint by index
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0


def test_normalisation_uses_training_statistics():
    train, test = load_dataset("wine", "train"), load_dataset("wine", "test")
    np.testing.assert_allclose(train.x.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(train.x.std(0), 1.0, atol=1e-4)
    raw_tr, raw_te = load_dataset("wine", "train", normalize=False), load_dataset("wine", "test", normalize=False)
    mean, std = raw_tr.x.mean(0), raw_tr.x.std(0)
    np.testing.assert_allclose(test.x, (raw_te.x - mean) / std, rtol=1e-4, atol=1e-4)
    d = load_dataset("digits", "train")
    assert abs(float(d.x.mean())) < 1e-4 and abs(float(d.x.std()) - 1) < 1e-4


def test_synthetic_is_seeded():
    a = load_dataset("synthetic", "train", seed=1, dim=3, num_classes=4, n_train=50, n_test=20)
    b = load_dataset("synthetic", "train", seed=1, dim=3, num_classes=4, n_train=50, n_test=20)
    c = load_dataset("synthetic", "train", seed=2, dim=3, num_classes=4, n_train=50, n_test=20)
    t = load_dataset("synthetic", "test", seed=1, dim=3, num_classes=4, n_train=50, n_test=20)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)
    assert a.x.shape == (50, 3) and t.x.shape == (20, 3) and a.num_classes == 4 and a.y.dtype == np.int32
    assert len(np.unique(np.concatenate([a.y, t.y]))) >= 3
    r = load_dataset("synthetic", "train", seed=0, task="regression", dim=1, n_train=64, n_test=0, noise=0.0)
    assert r.x.shape == (64, 1) and r.y.shape == (64, 1) and r.y.dtype == np.float32 and r.num_classes == 0
    assert len(load_dataset("synthetic", "test", task="regression", n_test=0)) == 0


@pytest.mark.parametrize("kwargs", [
    dict(name="imagenet"), dict(name="digits", split="valid"), dict(name="digits", dim=3),
    dict(name="synthetic", task="ranking"), dict(name="synthetic", n_train=0),
])
def test_bad_arguments_raise_value_error(kwargs):
    name = kwargs.pop("name")
    with pytest.raises(ValueError):
        load_dataset(name, **kwargs)


def test_dataset_helpers():
    d = load_dataset("iris", "test")
    assert d.input_shape == (4,) and not d.is_image and len(d.take(5)) == 5
    assert len(d.subset(d.y == 0)) == int(np.sum(d.y == 0))
    with pytest.raises(ValueError):
        Dataset(np.zeros((3, 2), np.float32), np.zeros(2, np.int32), 2, "bad")


@pytest.mark.parametrize("limit", [-5, 0, 2.5, True])
def test_limit_must_be_a_positive_count(limit):
    """A negative limit used to keep all but the last examples (slice(0, -5)) without a word."""
    with pytest.raises((TypeError, ValueError), match="limit must be an integer"):
        load_dataset("iris", "train", limit=limit)
    with pytest.raises((TypeError, ValueError), match="n must be an integer"):
        load_dataset("iris", "train").take(limit)
    assert len(load_dataset("iris", "train", limit=np.int64(7))) == 7


# ---------------------------------------------------------------------------------------------------------
# batches


def test_iterate_batches_covers_every_example_once_and_is_deterministic():
    d = load_dataset("iris", "train")
    batches = list(iterate_batches(d, 32, seed=3, epoch=1))
    assert [len(x) for x, _ in batches] == [32, 32, 32, 24] and len(batches) == num_batches(len(d), 32)
    xs = np.concatenate([x for x, _ in batches])
    assert sorted(map(bytes, xs)) == sorted(map(bytes, d.x))
    again = list(iterate_batches(d, 32, seed=3, epoch=1))
    for (a, ya), (b, yb) in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ya, yb)
    other_epoch = next(iterate_batches(d, 32, seed=3, epoch=2))[0]
    other_seed = next(iterate_batches(d, 32, seed=4, epoch=1))[0]
    assert not np.array_equal(batches[0][0], other_epoch) and not np.array_equal(batches[0][0], other_seed)
    dropped = list(iterate_batches(d, 32, seed=3, epoch=1, drop_last=True))
    assert len(dropped) == 3 == num_batches(len(d), 32, drop_last=True)
    ordered = np.concatenate([x for x, _ in iterate_batches(d, 50, seed=0, shuffle=False)])
    np.testing.assert_array_equal(ordered, d.x)


def test_augmentation_crops_and_flips():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8, 8, 3)).astype(np.float32)
    flipped_only = augment_batch(x, np.random.default_rng(1), pad=0)
    for a, b in zip(x, flipped_only, strict=True):
        assert np.array_equal(a, b) or np.array_equal(a[:, ::-1], b)
    assert any(not np.array_equal(a, b) for a, b in zip(x, flipped_only, strict=True))
    out = augment_batch(x, np.random.default_rng(2), pad=4, flip=False)
    assert out.shape == x.shape and out.dtype == np.float32
    # every output is a window of the zero-padded input
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for i in range(8):
        assert any(np.array_equal(out[i], padded[i, r:r + 8, c:c + 8]) for r in range(9) for c in range(9))
    d = load_dataset("digits", "train")
    a = [x for x, _ in iterate_batches(d, 100, seed=0, augment=True, pad=2)]
    b = [x for x, _ in iterate_batches(d, 100, seed=0, augment=True, pad=2)]
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], next(iterate_batches(d, 100, seed=0))[0])
    with pytest.raises(ValueError):
        next(iterate_batches(load_dataset("iris", "train"), 10, seed=0, augment=True))


# ---------------------------------------------------------------------------------------------------------
# TFDS: local builders, fail-fast, CIFAR / Tiny-ImageNet preparation offline


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "tiny_imagenet"])
def test_missing_tfds_dataset_fails_fast_with_instructions(name, tmp_path, monkeypatch):
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    start = time.perf_counter()
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, "train", data_dir=tmp_path)
    assert time.perf_counter() - start < 10.0
    msg = str(err.value)
    builder, version = tfds_local.tfds_name_and_version(name)
    assert str(tmp_path / builder / version) in msg
    assert "python -m mclandscape.engine.tfds_local prepare" in msg and name in msg
    assert isinstance(err.value, FileNotFoundError)


def test_missing_dataset_uses_tfds_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env_dir"))
    with pytest.raises(DatasetNotFoundError, match="env_dir"):
        load_dataset("cifar10", "test")


def test_tfrecord_only_dataset_is_reported(tmp_path):
    vdir = tmp_path / "cifar10" / "3.0.2"
    vdir.mkdir(parents=True)
    (vdir / "dataset_info.json").write_text("{}")
    (vdir / "cifar10-train.tfrecord-00000-of-00001").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match="array_record"):
        load_dataset("cifar10", "train", data_dir=tmp_path)


def test_versions_match_the_installed_tfds_builders():
    import tensorflow_datasets as tfds

    for name in ("cifar10", "cifar100"):
        assert str(tfds.builder_cls(name).VERSION) == tfds_local.tfds_name_and_version(name)[1]


_CIFAR_LAYOUT = {  # the binary archives' layout (what TFDS's CIFAR builders read)
    "cifar10": dict(prefix="cifar-10-batches-bin", train=[f"data_batch_{i}.bin" for i in range(1, 6)],
                    test=["test_batch.bin"], label_files=["batches.meta.txt"], label_keys=["label"]),
    "cifar100": dict(prefix="cifar-100-binary", train=["train.bin"], test=["test.bin"],
                     label_files=["coarse_label_names.txt", "fine_label_names.txt"],
                     label_keys=["coarse_label", "label"]),
}


def _fake_cifar_archive(path, name, n_train_per_file, n_test, seed=0):
    rng = np.random.default_rng(seed)
    lay = _CIFAR_LAYOUT[name]
    n_labels = len(lay["label_keys"])
    records = {}
    with tarfile.open(path, "w:gz") as tar:
        def add(fname, data):
            info = tarfile.TarInfo(f"{lay['prefix']}/{fname}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for fname, n in [(f, n_train_per_file) for f in lay["train"]] + [(f, n_test) for f in lay["test"]]:
            labels = rng.integers(0, 20 if n_labels == 2 else 10, (n, n_labels), dtype=np.uint8)
            images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            records[fname] = (labels, images)
            add(fname, np.concatenate([labels, images], 1).tobytes())
        for fname, k in zip(lay["label_files"], [10] if n_labels == 1 else [20, 100], strict=True):
            add(fname, "\n".join(f"class{i}" for i in range(k)).encode())
    return records


def test_cifar10_prepared_offline_is_read_through_tfds(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    records = _fake_cifar_archive(archive, "cifar10", n_train_per_file=3, n_test=5)
    with pytest.raises(DatasetNotFoundError):
        load_dataset("cifar10", "test", data_dir=tmp_path / "tfds")
    tfds_local.prepare_cifar("cifar10", archive, tmp_path / "tfds")
    test = load_dataset("cifar10", "test", data_dir=tmp_path / "tfds", normalize=False)
    assert test.x.shape == (5, 32, 32, 3) and test.num_classes == 10 and test.x.dtype == np.float32
    labels, images = records["test_batch.bin"]
    expected = {(int(lab[0]), img.reshape(3, 32, 32).transpose(1, 2, 0).tobytes()) for lab, img in
                zip(labels, images, strict=True)}
    got = {(int(lab), np.round(img * 255).astype(np.uint8).tobytes()) for lab, img in zip(test.y, test.x,
                                                                                            strict=True)}
    assert got == expected
    train = load_dataset("cifar10", "train", data_dir=tmp_path / "tfds")
    assert train.x.shape == (15, 32, 32, 3)
    raw = load_dataset("cifar10", "train", data_dir=tmp_path / "tfds", normalize=False)
    from mclandscape.engine.data import IMAGE_STATS

    mean, std = IMAGE_STATS["cifar10"]
    np.testing.assert_allclose(train.x, (raw.x - np.asarray(mean)) / np.asarray(std), rtol=1e-5, atol=1e-5)
    assert len(load_dataset("cifar10", "train", data_dir=tmp_path / "tfds", limit=4)) == 4
    batch = next(iterate_batches(train, 8, seed=0, augment=True))[0]
    assert batch.shape == (8, 32, 32, 3)


def test_cifar100_prepared_offline_from_the_command_line(tmp_path, capsys):
    archive = tmp_path / "cifar-100-binary.tar.gz"
    _fake_cifar_archive(archive, "cifar100", n_train_per_file=6, n_test=4)
    assert tfds_local.main(["prepare", "cifar100", "--archive", str(archive), "--data-dir", str(tmp_path / "tfds")]) == 0
    assert "prepared cifar100" in capsys.readouterr().out
    d = load_dataset("cifar100", "train", data_dir=tmp_path / "tfds")
    assert d.x.shape == (6, 32, 32, 3) and d.num_classes == 100


def test_tiny_imagenet_from_manual_directory_and_zip(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "manual" / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    ann = []
    for w in wnids:
        (root / "train" / w / "images").mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                root / "train" / w / "images" / f"{w}_{k}.JPEG", format="jpeg")
        # one grayscale validation image per class (the real set has some)
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(
            root / "val" / "images" / f"val_{w}.JPEG", format="jpeg")
        ann.append(f"val_{w}.JPEG\t{w}\t0\t0\t10\t10")
    (root / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    tfds_local.prepare_tiny_imagenet(tmp_path / "manual", tmp_path / "tfds")
    train = load_dataset("tiny_imagenet", "train", data_dir=tmp_path / "tfds")
    test = load_dataset("tiny_imagenet", "test", data_dir=tmp_path / "tfds")
    assert train.x.shape == (6, 64, 64, 3) and test.x.shape == (3, 64, 64, 3) and train.num_classes == 200
    assert sorted(test.y.tolist()) == [0, 1, 2] and np.bincount(train.y).tolist() == [2, 2, 2]
    shutil.make_archive(str(tmp_path / "zipped" / "tiny-imagenet-200"), "zip", tmp_path / "manual",
                        "tiny-imagenet-200")
    tfds_local.prepare_tiny_imagenet(tmp_path / "zipped", tmp_path / "tfds_zip")
    test_zip = load_dataset("tiny_imagenet", "test", data_dir=tmp_path / "tfds_zip")
    order = np.argsort(test.y)
    np.testing.assert_array_equal(test_zip.x[np.argsort(test_zip.y)], test.x[order])
