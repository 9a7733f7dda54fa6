"""Local TFDS builders and offline preparation (no network, no TensorFlow).

Everything here writes the standard TFDS on-disk layout in the ``array_record`` format, which
``tfds.data_source`` reads without TensorFlow:

- ``mcl_digits``, ``mcl_iris``, ``mcl_wine``, ``mcl_breast_cancer``, ``mcl_mnist1d``: the offline datasets
  of :mod:`mclandscape.engine.data`, built from the installed packages (scikit-learn, mnist1d). They make the TFDS
  path testable offline: ``load_dataset("digits", source="tfds")`` builds and reads ``mcl_digits``.
- ``tiny_imagenet``: built from the manually provided ``tiny-imagenet-200.zip`` or its extracted folder
  (TFDS has no Tiny-ImageNet builder).
- ``cifar10`` / ``cifar100``: TFDS's own builders need the network and TensorFlow to prepare;
  :func:`prepare_cifar` writes the identical ``cifar10/3.0.2`` (``cifar100/3.0.2``) dataset from the
  binary archive ``cifar-10-binary.tar.gz`` (``cifar-100-binary.tar.gz``) instead, parsing its raw bytes
  (nothing is unpickled).

Command line::

    python -m mclandscape.engine.tfds_local prepare cifar10 --archive cifar-10-binary.tar.gz --data-dir DIR
    python -m mclandscape.engine.tfds_local prepare tiny_imagenet --manual-dir DIR_WITH_ZIP --data-dir DIR
    python -m mclandscape.engine.tfds_local prepare digits --data-dir DIR
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

__all__ = [
    "OFFLINE_BUILDERS",
    "TFDS_VERSIONS",
    "tfds_name_and_version",
    "preparation_instructions",
    "prepare_offline",
    "prepare_cifar",
    "prepare_tiny_imagenet",
    "TinyImagenet",
]

# mclandscape dataset name -> (TFDS builder name, version)
OFFLINE_BUILDERS = {"digits": "mcl_digits", "iris": "mcl_iris", "wine": "mcl_wine",
                    "breast_cancer": "mcl_breast_cancer", "mnist1d": "mcl_mnist1d"}
TFDS_VERSIONS = {"cifar10": ("cifar10", "3.0.2"), "cifar100": ("cifar100", "3.0.2"),
                 "tiny_imagenet": ("tiny_imagenet", "1.0.0"),
                 **{k: (v, "1.0.0") for k, v in OFFLINE_BUILDERS.items()}}

CIFAR_URLS = {"cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
              "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"}
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def tfds_name_and_version(name: str) -> tuple[str, str]:
    """TFDS builder name and version directory that hold mclandscape dataset ``name``.

    Args:
      name: an mclandscape dataset name (a key of :data:`TFDS_VERSIONS`).

    Returns:
      ``(builder_name, version)``. Raises ``ValueError`` naming the known datasets for any other name.

    Example:
        >>> tfds_name_and_version("cifar10"), tfds_name_and_version("digits")
        (('cifar10', '3.0.2'), ('mcl_digits', '1.0.0'))
    """
    try:
        return TFDS_VERSIONS[name]
    except KeyError:
        raise ValueError(f"dataset {name!r} has no TFDS builder; known: {sorted(TFDS_VERSIONS)}") from None


def preparation_instructions(name: str, data_dir: str | os.PathLike) -> str:
    """Human-readable steps that put dataset ``name`` where :func:`mclandscape.engine.data.load_dataset` reads it.

    Args:
      name: an mclandscape dataset name with a TFDS builder.
      data_dir: the TFDS data directory the steps write to.

    Returns:
      The instructions (the text of the error a missing dataset raises). Raises ``ValueError`` for a name
      without preparation steps.

    Example:
        >>> preparation_instructions("iris", "/data/tfds")
        'Build it with: python -m mclandscape.engine.tfds_local prepare iris --data-dir /data/tfds'
    """
    d = str(data_dir)
    if name in ("cifar10", "cifar100"):
        archive = CIFAR_URLS[name].rsplit("/", 1)[1]
        return (f"To prepare it: download {archive} ({CIFAR_URLS[name]}) on any machine, then run\n"
                f"    python -m mclandscape.engine.tfds_local prepare {name} --archive /path/to/{archive} "
                f"--data-dir {d}\n"
                f"(or, on a machine with network and TensorFlow: "
                f"tfds build {name} --file_format=array_record --data_dir {d}; then copy {d}/{name}).")
    if name == "tiny_imagenet":
        return (f"To prepare it: download tiny-imagenet-200.zip ({TINY_IMAGENET_URL}), put the zip or its "
                f"extracted folder tiny-imagenet-200/ in a directory MANUAL, then run\n"
                f"    python -m mclandscape.engine.tfds_local prepare tiny_imagenet --manual-dir MANUAL "
                f"--data-dir {d}")
    if name in OFFLINE_BUILDERS:
        return f"Build it with: python -m mclandscape.engine.tfds_local prepare {name} --data-dir {d}"
    raise ValueError(f"no preparation steps for {name!r}")


_CONFIG = dict(try_download_gcs=False)


class _NoCodePath:
    """Mixin: no checksums file next to the builder's code.

    TFDS looks for ``checksums.tsv`` beside a builder's module, and for a builder inside a package that
    lookup imports ``importlib_resources`` (not a dependency here). These builders download nothing, so
    they have no checksums."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None


# ----------------------------------------------------------------------------------------------------------
# offline datasets


class _OfflineBuilder(_NoCodePath, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A dataset of :mod:`mclandscape.engine.data` generated from installed packages (fixed train/test split).

    Features: ``x`` (float32, un-normalised), ``label`` and ``index`` (the example's position in the
    split, so readers can restore the generation order after TFDS's write-time shuffle)."""

    VERSION = tfds.core.Version("1.0.0")
    DATASET = ""
    SHAPE: tuple[int, ...] = ()
    NUM_CLASSES = 0

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"mclandscape's offline '{self.DATASET}' dataset (fixed 80/20 split).",
            features=tfds.features.FeaturesDict({
                "x": tfds.features.Tensor(shape=self.SHAPE, dtype=np.float32),
                "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
                "index": tfds.features.Scalar(dtype=np.int64),
            }),
            supervised_keys=("x", "label"),
        )

    def _split_generators(self, dl_manager):
        from mclandscape.engine.data import offline_raw

        xtr, ytr, xte, yte = offline_raw(self.DATASET)
        return {"train": self._generate_examples(xtr, ytr), "test": self._generate_examples(xte, yte)}

    def _generate_examples(self, x, y):
        for i in range(len(y)):
            yield i, {"x": np.asarray(x[i], np.float32), "label": int(y[i]), "index": i}


class MclDigits(_OfflineBuilder):
    name = "mcl_digits"
    DATASET, SHAPE, NUM_CLASSES = "digits", (8, 8, 1), 10


class MclIris(_OfflineBuilder):
    name = "mcl_iris"
    DATASET, SHAPE, NUM_CLASSES = "iris", (4,), 3


class MclWine(_OfflineBuilder):
    name = "mcl_wine"
    DATASET, SHAPE, NUM_CLASSES = "wine", (13,), 3


class MclBreastCancer(_OfflineBuilder):
    name = "mcl_breast_cancer"
    DATASET, SHAPE, NUM_CLASSES = "breast_cancer", (30,), 2


class MclMnist1d(_OfflineBuilder):
    name = "mcl_mnist1d"
    DATASET, SHAPE, NUM_CLASSES = "mnist1d", (40,), 10


_OFFLINE_CLASSES = {c.DATASET: c for c in (MclDigits, MclIris, MclWine, MclBreastCancer, MclMnist1d)}


def prepare_offline(name: str, data_dir: str | os.PathLike) -> Path:
    """Build the local TFDS dataset of offline dataset ``name`` under ``data_dir`` (no-op when present).

    Args:
      name: ``"digits"``, ``"iris"``, ``"wine"``, ``"breast_cancer"`` or ``"mnist1d"`` (generated from the
        installed scikit-learn / mnist1d packages, no network).
      data_dir: the TFDS data directory.

    Returns:
      The version directory (e.g. ``data_dir/mcl_iris/1.0.0``). Raises ``ValueError`` for another name.

    Example:
        >>> prepare_offline("mnist", "/tmp/tfds")
        Traceback (most recent call last):
        ...
        ValueError: 'mnist' is not an offline dataset; choose one of ['breast_cancer', 'digits', 'iris', 'mnist1d', 'wine']
    """
    if name not in _OFFLINE_CLASSES:
        raise ValueError(f"{name!r} is not an offline dataset; choose one of {sorted(_OFFLINE_CLASSES)}")
    builder = _OFFLINE_CLASSES[name](data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(**_CONFIG))
    return Path(builder.data_dir)


# ----------------------------------------------------------------------------------------------------------
# CIFAR from the binary archives

_CIFAR_LAYOUT = {
    "cifar10": dict(prefix="cifar-10-batches-bin", train=[f"data_batch_{i}.bin" for i in range(1, 6)],
                    test=["test_batch.bin"], label_files=["batches.meta.txt"], label_keys=["label"]),
    "cifar100": dict(prefix="cifar-100-binary", train=["train.bin"], test=["test.bin"],
                     label_files=["coarse_label_names.txt", "fine_label_names.txt"],
                     label_keys=["coarse_label", "label"]),
}


def _read_cifar_files(archive: Path, name: str) -> dict[str, bytes]:
    """The raw member files of a CIFAR binary archive (``.tar.gz``) or of its extracted folder."""
    lay = _CIFAR_LAYOUT[name]
    wanted = lay["train"] + lay["test"] + lay["label_files"]
    out: dict[str, bytes] = {}
    if archive.is_dir():
        base = archive / lay["prefix"] if (archive / lay["prefix"]).is_dir() else archive
        for f in wanted:
            p = base / f
            if p.is_file():
                out[f] = p.read_bytes()
    elif archive.is_file():
        with tarfile.open(archive, "r:*") as tar:
            for member in tar.getmembers():
                fname = member.name.rsplit("/", 1)[-1]
                if member.isfile() and fname in wanted:
                    out[fname] = tar.extractfile(member).read()
    else:
        raise FileNotFoundError(f"CIFAR archive {archive} does not exist")
    missing = [f for f in lay["train"] + lay["test"] if f not in out]
    if missing:
        raise FileNotFoundError(f"{archive} is not the {name} binary archive ({CIFAR_URLS[name]}): "
                                f"missing {missing}")
    return out


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="png")
    return buf.getvalue()


def _cifar_builder_class(name: str):
    from tensorflow_datasets.image_classification import cifar

    base = cifar.Cifar10 if name == "cifar10" else cifar.Cifar100

    class LocalCifar(_NoCodePath, base, skip_registration=True):
        """TFDS's CIFAR builder reading a local binary archive instead of downloading it."""

        archive: Path | None = None

        def _split_generators(self, dl_manager):
            lay = _CIFAR_LAYOUT[name]
            files = _read_cifar_files(Path(self.archive), name)
            for key, label_file in zip(lay["label_keys"], lay["label_files"], strict=True):
                if label_file in files:
                    names = [n for n in files[label_file].decode().split("\n") if n.strip()]
                    self.info.features[key].names = names
            return {
                "train": self._generate_examples("train_", [files[f] for f in lay["train"]]),
                "test": self._generate_examples("test_", [files[f] for f in lay["test"]]),
            }

        def _generate_examples(self, split_prefix, blobs):
            keys = _CIFAR_LAYOUT[name]["label_keys"]
            rec = len(keys) + 3072
            index = 0
            for blob in blobs:
                arr = np.frombuffer(blob, dtype=np.uint8)
                if arr.size % rec:
                    raise ValueError(f"corrupt {name} archive: a batch file of {arr.size} bytes is not a "
                                     f"multiple of the {rec}-byte record")
                arr = arr.reshape(-1, rec)
                for row in arr:
                    record = {k: int(v) for k, v in zip(keys, row[: len(keys)], strict=True)}
                    record["id"] = f"{split_prefix}{index:05d}"
                    record["image"] = _png(row[len(keys):].reshape(3, 32, 32).transpose(1, 2, 0))
                    yield index, record
                    index += 1

    LocalCifar.name = base.name
    return LocalCifar


def prepare_cifar(name: str, archive: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """Write TFDS's ``cifar10`` / ``cifar100`` (version 3.0.2, array_record) from the binary archive, offline.

    Args:
      name: ``"cifar10"`` or ``"cifar100"``.
      archive: ``cifar-10-binary.tar.gz`` / ``cifar-100-binary.tar.gz``, or its extracted folder.
      data_dir: the TFDS data directory.

    Returns:
      The version directory. Raises ``ValueError`` for another name and ``FileNotFoundError`` naming the
      archive when it is missing or is not the expected archive.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     prepare_cifar("cifar10", f"{d}/cifar-10-binary.tar.gz", d)
        Traceback (most recent call last):
        ...
        FileNotFoundError: CIFAR archive .../cifar-10-binary.tar.gz does not exist
    """
    if name not in _CIFAR_LAYOUT:
        raise ValueError(f"prepare_cifar handles 'cifar10' and 'cifar100', not {name!r}")
    cls = _cifar_builder_class(name)
    builder = cls(data_dir=str(data_dir), file_format="array_record")
    builder.archive = Path(archive)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(**_CONFIG))
    return Path(builder.data_dir)


# ----------------------------------------------------------------------------------------------------------
# Tiny-ImageNet from the manually provided archive


class _TinySource:
    """Files of ``tiny-imagenet-200`` from the zip or the extracted folder under ``manual_dir``."""

    def __init__(self, manual_dir: Path):
        manual_dir = Path(manual_dir)
        self.zip = None
        self.root: Path | None = None
        candidates = [manual_dir / "tiny-imagenet-200", manual_dir]
        for c in candidates:
            if (c / "wnids.txt").is_file():
                self.root = c
                break
        if self.root is None:
            z = manual_dir / "tiny-imagenet-200.zip"
            if not z.is_file():
                raise FileNotFoundError(
                    f"Tiny-ImageNet not found in {manual_dir}: expected tiny-imagenet-200.zip or the folder "
                    f"tiny-imagenet-200/ (with wnids.txt, train/, val/). {TINY_IMAGENET_URL}")
            self.zip = zipfile.ZipFile(z)
            self.names = set(self.zip.namelist())

    def read(self, rel: str) -> bytes:
        if self.zip is not None:
            return self.zip.read(f"tiny-imagenet-200/{rel}")
        return (self.root / rel).read_bytes()

    def list(self, rel_dir: str) -> list[str]:
        """File names directly inside ``rel_dir`` (sorted)."""
        if self.zip is not None:
            prefix = f"tiny-imagenet-200/{rel_dir.rstrip('/')}/"
            return sorted(n[len(prefix):] for n in self.names
                          if n.startswith(prefix) and "/" not in n[len(prefix):] and n != prefix)
        d = self.root / rel_dir
        return sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def _rgb_image_bytes(raw: bytes) -> bytes:
    """Original JPEG bytes when the image is a 64×64 RGB image, else a lossless RGB PNG of it."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as im:
        if im.mode == "RGB" and im.size == (64, 64):
            return raw
        rgb = im.convert("RGB")
        if rgb.size != (64, 64):
            rgb = rgb.resize((64, 64))
        return _png(np.asarray(rgb))


class TinyImagenet(_NoCodePath, tfds.core.GeneratorBasedBuilder):
    """Tiny-ImageNet (Le & Yang 2015): 200 classes of 64×64 RGB images, 500 train and 50 validation images each.

    Labels index the sorted WordNet ids. mclandscape's "test" split is ``validation`` (the official test
    images carry no labels). Build it with :func:`prepare_tiny_imagenet`.

    Example:
        >>> TinyImagenet.name, str(TinyImagenet.VERSION)
        ('tiny_imagenet', '1.0.0')
    """

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Download tiny-imagenet-200.zip from {TINY_IMAGENET_URL} and place the zip, or its extracted "
        f"folder tiny-imagenet-200/, in the manual directory."
    )

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="Tiny-ImageNet: 200 classes, 64x64 images (train 100000, validation 10000).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(64, 64, 3), encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=200),
                "id": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="https://www.kaggle.com/c/tiny-imagenet",
        )

    def _split_generators(self, dl_manager):
        src = _TinySource(Path(dl_manager.manual_dir))
        wnids = sorted(w.strip() for w in src.read("wnids.txt").decode().split("\n") if w.strip())
        if not 0 < len(wnids) <= 200 or len(set(wnids)) != len(wnids):
            raise ValueError(f"wnids.txt lists {len(wnids)} ids; Tiny-ImageNet has 200 distinct ones")
        # (fewer than 200 only in small test fixtures; the missing names are placeholders)
        self.info.features["label"].names = wnids + [f"unused_{i}" for i in range(200 - len(wnids))]
        return {"train": self._train_examples(src, wnids), "validation": self._val_examples(src, wnids)}

    def _train_examples(self, src: _TinySource, wnids: list[str]) -> Iterator:
        for label, wnid in enumerate(wnids):
            for fname in src.list(f"train/{wnid}/images"):
                raw = src.read(f"train/{wnid}/images/{fname}")
                yield fname, {"image": _rgb_image_bytes(raw), "label": label, "id": fname}

    def _val_examples(self, src: _TinySource, wnids: list[str]) -> Iterator:
        index = {w: i for i, w in enumerate(wnids)}
        for line in src.read("val/val_annotations.txt").decode().split("\n"):
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            fname, wnid = parts[0], parts[1]
            raw = src.read(f"val/images/{fname}")
            yield fname, {"image": _rgb_image_bytes(raw), "label": index[wnid], "id": fname}

    def _generate_examples(self, **kwargs):  # pragma: no cover - the split generators above are used
        raise NotImplementedError


def prepare_tiny_imagenet(manual_dir: str | os.PathLike, data_dir: str | os.PathLike) -> Path:
    """Build ``tiny_imagenet`` (array_record) under ``data_dir`` from the manually downloaded archive.

    Args:
      manual_dir: a folder holding ``tiny-imagenet-200.zip`` or the extracted ``tiny-imagenet-200/``.
      data_dir: the TFDS data directory.

    Returns:
      The version directory. Raises ``FileNotFoundError`` saying what was expected (and where to download
      it) when ``manual_dir`` holds neither.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     prepare_tiny_imagenet(d, d)
        Traceback (most recent call last):
        ...
        FileNotFoundError: Tiny-ImageNet not found in ...: expected tiny-imagenet-200.zip or the folder ...
    """
    builder = TinyImagenet(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir), **_CONFIG))
    return Path(builder.data_dir)


# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mclandscape.engine.tfds_local",
                                     description="Prepare datasets for mclandscape offline (array_record).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build a dataset into a TFDS data directory")
    p.add_argument("name", choices=sorted(TFDS_VERSIONS))
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default $TFDS_DATA_DIR or "
                                                     "~/tensorflow_datasets)")
    p.add_argument("--archive", default=None, help="CIFAR binary archive (.tar.gz) or extracted folder")
    p.add_argument("--manual-dir", default=None, help="folder holding tiny-imagenet-200.zip or its folder")
    args = parser.parse_args(argv)
    from mclandscape.engine.data import resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir)
    if args.name in ("cifar10", "cifar100"):
        if not args.archive:
            parser.error(f"{args.name} needs --archive ({CIFAR_URLS[args.name]})")
        out = prepare_cifar(args.name, args.archive, data_dir)
    elif args.name == "tiny_imagenet":
        if not args.manual_dir:
            parser.error(f"tiny_imagenet needs --manual-dir (a folder holding tiny-imagenet-200.zip; "
                         f"{TINY_IMAGENET_URL})")
        out = prepare_tiny_imagenet(args.manual_dir, data_dir)
    else:
        out = prepare_offline(args.name, data_dir)
    print(f"prepared {args.name} in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
