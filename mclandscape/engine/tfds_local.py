"""Local TFDS builders and offline preparation (no network, no TensorFlow).

Everything here writes the standard TFDS on-disk layout in the ``array_record`` format, which
``tfds.data_source`` reads without TensorFlow:

- ``tiny_imagenet``: built from the manually provided ``tiny-imagenet-200.zip`` or its extracted folder
  (TFDS has no Tiny-ImageNet builder).
- ``cifar10`` / ``cifar100``: TFDS's own builders need the network and TensorFlow to prepare;
  :func:`prepare_cifar` writes the identical ``cifar10/3.0.2`` (``cifar100/3.0.2``) dataset from the
  binary archive ``cifar-10-binary.tar.gz`` (``cifar-100-binary.tar.gz``) instead, parsing its raw bytes
  (nothing is unpickled), with TFDS's own builder class for everything else.

Command line::

    python -m mclandscape.engine.tfds_local prepare cifar10 --archive cifar-10-binary.tar.gz --data-dir DIR
    python -m mclandscape.engine.tfds_local prepare tiny_imagenet --manual-dir DIR_WITH_ZIP --data-dir DIR
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from mclandscape.core import _checks

__all__ = ["TFDS_VERSIONS", "tfds_name_and_version", "preparation_instructions", "prepare_cifar",
           "prepare_tiny_imagenet", "TinyImagenet"]

# mclandscape dataset -> (TFDS builder name, version)
TFDS_VERSIONS = {"cifar10": ("cifar10", "3.0.2"), "cifar100": ("cifar100", "3.0.2"),
                 "tiny_imagenet": ("tiny_imagenet", "1.0.0")}

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
        >>> tfds_name_and_version("cifar10"), tfds_name_and_version("tiny_imagenet")
        (('cifar10', '3.0.2'), ('tiny_imagenet', '1.0.0'))
    """
    return TFDS_VERSIONS[_checks.choice(name, "dataset (with a TFDS builder)", TFDS_VERSIONS)]


def preparation_instructions(name: str, data_dir: str | os.PathLike) -> str:
    """Human-readable steps that put dataset ``name`` where :func:`mclandscape.engine.data.load_dataset` reads it.

    Args:
      name: an mclandscape dataset name with a TFDS builder.
      data_dir: the TFDS data directory the steps write to.

    Returns:
      The instructions (the text of the error a missing dataset raises). Raises ``ValueError`` for a name
      without preparation steps.

    Example:
        >>> preparation_instructions("tiny_imagenet", "/data/tfds").splitlines()[1]
        '    python -m mclandscape.engine.tfds_local prepare tiny_imagenet --manual-dir MANUAL --data-dir /data/tfds'
    """
    d = f"--data-dir {data_dir}"
    if name in CIFAR_URLS:
        archive = CIFAR_URLS[name].rsplit("/", 1)[1]
        return (f"To prepare it: download {archive} ({CIFAR_URLS[name]}) on any machine, then run\n"
                f"    python -m mclandscape.engine.tfds_local prepare {name} --archive /path/to/{archive} {d}\n"
                f"(or, on a machine with network and TensorFlow: "
                f"tfds build {name} --file_format=array_record --data_dir {data_dir}; then copy {data_dir}/{name}).")
    _checks.choice(name, "dataset (with preparation steps)", TFDS_VERSIONS)  # tiny_imagenet is the one left
    return (f"To prepare it: download tiny-imagenet-200.zip ({TINY_IMAGENET_URL}), put the zip or its "
            f"extracted folder tiny-imagenet-200/ in a directory MANUAL, then run\n"
            f"    python -m mclandscape.engine.tfds_local prepare tiny_imagenet --manual-dir MANUAL {d}")


def _prepare(builder, **download) -> Path:
    """Write ``builder``'s dataset (array_record, nothing downloaded; a no-op when present): its version dir."""
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False, **download))
    return Path(builder.data_dir)


class _NoCodePath:
    """Mixin: no checksums file next to the builder's code.

    TFDS looks for ``checksums.tsv`` beside a builder's module, and for a builder inside a package that
    lookup imports ``importlib_resources`` (not a dependency here). These builders download nothing, so
    they have no checksums."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        return None


def _png(image: np.ndarray) -> bytes:
    """A PNG of ``image`` (TFDS encodes arrays with TensorFlow, which is not a dependency)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="png")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# CIFAR from the binary archives


def _local_cifar(name: str):
    """TFDS's own CIFAR builder (its layout, features and label names) reading the archive extracted at
    ``self.root`` instead of downloading it, and parsing the binary records with NumPy instead of TensorFlow."""
    from tensorflow_datasets.image_classification import cifar

    class LocalCifar(_NoCodePath, cifar.Cifar10 if name == "cifar10" else cifar.Cifar100, skip_registration=True):
        root = Path()

        def _split_generators(self, dl_manager):
            return super()._split_generators(types.SimpleNamespace(download_and_extract=lambda url: str(self.root)))

        def _generate_examples(self, split_prefix, filepaths):
            keys = self._cifar_info.label_keys
            rec = len(keys) + 3072
            data = np.concatenate([np.fromfile(p, np.uint8) for p in filepaths])
            if data.size % rec:
                raise ValueError(f"corrupt {name} archive: its {split_prefix}files are not whole {rec}-byte records")
            for index, row in enumerate(data.reshape(-1, rec)):
                image = _png(row[len(keys):].reshape(3, 32, 32).transpose(1, 2, 0))
                yield index, {**dict(zip(keys, row[:len(keys)].tolist(), strict=True)), "image": image,
                              "id": f"{split_prefix}{index:05d}"}

    LocalCifar.name = name
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
    builder = _local_cifar(_checks.choice(name, "prepare_cifar's name", CIFAR_URLS))(data_dir=str(data_dir),
                                                                                   file_format="array_record")
    archive, info = Path(archive), builder._cifar_info
    if not archive.exists():
        raise FileNotFoundError(f"CIFAR archive {archive} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        if archive.is_file():
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter="data")
            builder.root = Path(tmp)
        else:  # the extracted folder, or the folder above it
            builder.root = archive if (archive / info.prefix).is_dir() else archive.parent
        missing = [f for f in info.train_files + info.test_files + info.label_files
                   if not (builder.root / info.prefix / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{archive} is not the {name} binary archive ({CIFAR_URLS[name]}): "
                                    f"missing {missing}")
        return _prepare(builder)


# ----------------------------------------------------------------------------------------------------------
# Tiny-ImageNet from the manually provided archive


def _tiny_root(manual_dir: Path):
    """The ``tiny-imagenet-200`` folder under ``manual_dir``, or the same folder inside its zip (a ``zipfile.Path``)."""
    for folder in (manual_dir / "tiny-imagenet-200", manual_dir):
        if (folder / "wnids.txt").is_file():
            return folder
    if not (manual_dir / "tiny-imagenet-200.zip").is_file():
        raise FileNotFoundError(
            f"Tiny-ImageNet not found in {manual_dir}: expected tiny-imagenet-200.zip or the folder "
            f"tiny-imagenet-200/ (with wnids.txt, train/, val/). {TINY_IMAGENET_URL}")
    return zipfile.Path(manual_dir / "tiny-imagenet-200.zip", "tiny-imagenet-200/")


def _rgb_image_bytes(raw: bytes) -> bytes:
    """Original JPEG bytes when the image is a 64×64 RGB image, else a lossless RGB PNG of it."""
    from PIL import Image

    with Image.open(io.BytesIO(raw)) as im:
        if im.mode == "RGB" and im.size == (64, 64):
            return raw
        return _png(np.asarray(im.convert("RGB").resize((64, 64))))


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
        root = _tiny_root(Path(dl_manager.manual_dir))
        wnids = sorted(w.strip() for w in (root / "wnids.txt").read_text().split("\n") if w.strip())
        if not 0 < len(wnids) <= 200 or len(set(wnids)) != len(wnids):
            raise ValueError(f"wnids.txt lists {len(wnids)} ids; Tiny-ImageNet has 200 distinct ones")
        # (fewer than 200 only in small test fixtures; the missing names are placeholders)
        self.info.features["label"].names = wnids + [f"unused_{i}" for i in range(200 - len(wnids))]
        val = [line.split("\t")[:2] for line in (root / "val" / "val_annotations.txt").read_text().split("\n")
               if line.count("\t")]
        train = [(f, w) for w in wnids for f in sorted(p.name for p in (root / "train" / w / "images").iterdir())]
        return {"train": self._generate_examples(root, train, "train/{1}/images/{0}", wnids),
                "validation": self._generate_examples(root, val, "val/images/{0}", wnids)}

    def _generate_examples(self, root, files: list, where: str, wnids: list[str]) -> Iterator:
        for fname, wnid in files:
            raw = (root / where.format(fname, wnid)).read_bytes()
            yield fname, {"image": _rgb_image_bytes(raw), "label": wnids.index(wnid), "id": fname}


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
    return _prepare(TinyImagenet(data_dir=str(data_dir), file_format="array_record"), manual_dir=str(manual_dir))


# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mclandscape.engine.tfds_local",
                                     description="Prepare datasets for mclandscape offline (array_record).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="build a dataset into a TFDS data directory")
    p.add_argument("name", choices=sorted(TFDS_VERSIONS))
    p.add_argument("--data-dir", default=None, help="TFDS data dir (default $TFDS_DATA_DIR or "
                                                     "~/tensorflow_datasets)")
    # one source argument under both names: CIFAR's binary archive, Tiny-ImageNet's manual folder
    p.add_argument("--archive", "--manual-dir", dest="source", required=True,
                   help="CIFAR binary archive (.tar.gz) or its extracted folder; for tiny_imagenet the folder "
                        f"holding tiny-imagenet-200.zip or tiny-imagenet-200/ ({TINY_IMAGENET_URL})")
    args = parser.parse_args(argv)
    from mclandscape.engine.data import resolve_data_dir

    data_dir = resolve_data_dir(args.data_dir)
    out = (prepare_cifar(args.name, args.source, data_dir) if args.name in CIFAR_URLS
           else prepare_tiny_imagenet(args.source, data_dir))
    print(f"prepared {args.name} in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
