"""Datasets, label hierarchies and on-device preprocessing for MAXL.

Host side (numpy):

* :func:`load_dataset` reads a whole data set into memory as uint8 images plus int32 labels.
  Data come from a TFDS ``array_record`` build through ``tfds.data_source`` (readable without
  TensorFlow) or, for Fashion-MNIST and EMNIST-letters, directly from four IDX ``.gz`` archives.
* The primary task and the human auxiliary task form a hierarchy ``psi``: ``psi[i]`` auxiliary classes
  belong to primary class ``i`` and occupy the auxiliary indices ``[sum(psi[:i]), sum(psi[:i+1]))``.

Device side (JAX, jittable, static shapes): :func:`normalize`, :func:`augment`, :func:`preprocess`.
They reproduce the reference pipeline ``RandomCrop(32, padding=4)`` (zero padding before
normalisation) + ``RandomHorizontalFlip()`` + ``Normalize(0.5, 0.2)``.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import pathlib
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "SHARED_DATA_ENV",
    "DATASETS",
    "FASHION_MNIST_FILES",
    "EMNIST_LETTERS_FILES",
    "EMNIST_LETTERS_NAMES",
    "CIFAR100_FINE_TO_COARSE",
    "CIFAR100_COARSE20_TO_10",
    "CIFAR10_TO_3",
    "CIFAR100_FINE_NAMES",
    "CIFAR100_COARSE_NAMES",
    "CIFAR10_NAMES",
    "FASHION_MNIST_NAMES",
    "FASHION_MNIST_COARSE_GROUPS",
    "FASHION_MNIST_COARSE_NAMES",
    "FASHION_MNIST_FINE_TO_COARSE",
    "DatasetNotFoundError",
    "DatasetCorruptError",
    "Split",
    "Dataset",
    "shared_data_dir",
    "hierarchy_from_fine_to_primary",
    "read_idx_gz",
    "load_fashion_mnist_idx",
    "load_emnist_letters_idx",
    "stratified_subset",
    "load_dataset",
    "MEAN",
    "STD",
    "normalize",
    "augment",
    "preprocess",
]

SHARED_DATA_ENV = "MAXL_SHARED_DATA"

#: Names accepted by :func:`load_dataset`.
DATASETS = ("cifar100", "cifar10", "fashion_mnist", "fashion_mnist_coarse", "emnist_letters")

#: The four original Fashion-MNIST archives: split -> (images file, labels file).
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

#: EMNIST-letters (Cohen et al. 2017, arXiv:1702.05373) as IDX archives, in either of two layouts:
#: ``"upright"``, the Fashion-MNIST file names with labels 0..25 and images as a person reads them;
#: or ``"official"``, the names of the official ``gzip.zip`` release, labels 1..26 and every image
#: transposed (as NIST's column-major export left them). Both are read as upright images, labels
#: 0..25 (A..Z, each class holding both cases of its letter).
EMNIST_LETTERS_FILES = {
    "upright": FASHION_MNIST_FILES,
    "official": {
        "train": ("emnist-letters-train-images-idx3-ubyte.gz",
                  "emnist-letters-train-labels-idx1-ubyte.gz"),
        "test": ("emnist-letters-test-images-idx3-ubyte.gz",
                 "emnist-letters-test-labels-idx1-ubyte.gz"),
    },
}

# ---------------------------------------------------------------------------------------------------
# Label tables
# ---------------------------------------------------------------------------------------------------

#: Standard CIFAR-100 fine (100) -> coarse (20 superclasses) map; TFDS ``coarse_label`` follows it.
CIFAR100_FINE_TO_COARSE: tuple[int, ...] = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3,
    3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
    0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10,
    16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19,
    2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19,
    18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
)  # fmt: skip

#: MAXL reference (``create_dataset.py``): 20 superclasses -> 10 classes.
CIFAR100_COARSE20_TO_10: tuple[int, ...] = (1, 2, 5, 6, 5, 6, 6, 3, 0, 7, 8, 0, 1, 3, 4, 0, 2, 5, 9, 9)

#: MAXL reference (``create_dataset.py``): 10 classes -> 3 classes.
CIFAR10_TO_3: tuple[int, ...] = (0, 0, 0, 0, 0, 1, 2, 2, 2, 2)

CIFAR100_FINE_NAMES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

CIFAR100_COARSE_NAMES: tuple[str, ...] = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)  # fmt: skip

CIFAR10_NAMES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

FASHION_MNIST_NAMES: tuple[str, ...] = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip

#: Coarse Fashion-MNIST groups, in primary-class order: tops, trouser, dress, footwear, bag.
FASHION_MNIST_COARSE_GROUPS: tuple[tuple[int, ...], ...] = ((0, 2, 4, 6), (1,), (3,), (5, 7, 9), (8,))
FASHION_MNIST_COARSE_NAMES: tuple[str, ...] = ("tops", "trouser", "dress", "footwear", "bag")
#: Fashion-MNIST fine (10) -> coarse (5) map derived from :data:`FASHION_MNIST_COARSE_GROUPS`.
FASHION_MNIST_FINE_TO_COARSE: tuple[int, ...] = tuple(
    next(g for g, members in enumerate(FASHION_MNIST_COARSE_GROUPS) if f in members) for f in range(10)
)

EMNIST_LETTERS_NAMES: tuple[str, ...] = tuple(chr(ord("A") + i) for i in range(26))

_CIFAR100_LEVELS = (20, 10, 3)


# ---------------------------------------------------------------------------------------------------
# Errors and containers
# ---------------------------------------------------------------------------------------------------


class DatasetNotFoundError(FileNotFoundError):
    """The requested data set is not present (and was not, or could not be, downloaded)."""


class DatasetCorruptError(ValueError):
    """A data file exists but is truncated or malformed (the message names the file)."""


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: identity eq/hash (fields hold arrays)
class Split:
    """One split held in host memory.

    Attributes:
      images: uint8 ``(N, H, W, C)``.
      primary: int32 ``(N,)`` primary-task label in ``[0, num_primary)``.
      human_aux: int32 ``(N,)`` human auxiliary label in ``[0, sum(psi_human))``, re-indexed so the
        auxiliary classes of primary class ``i`` occupy ``[sum(psi[:i]), sum(psi[:i+1]))``; ``None``
        for data sets without a human auxiliary task.
    """

    images: np.ndarray
    primary: np.ndarray
    human_aux: np.ndarray | None = None

    def __post_init__(self):
        n = self.images.shape[0]
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, C), got shape {self.images.shape}")
        if self.primary.shape != (n,):
            raise ValueError(f"primary must have shape ({n},), got {self.primary.shape}")
        if self.human_aux is not None and self.human_aux.shape != (n,):
            raise ValueError(f"human_aux must have shape ({n},), got {self.human_aux.shape}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx: np.ndarray) -> "Split":
        """The examples ``idx`` of this split, as a new split."""
        return Split(images=self.images[idx], primary=self.primary[idx],
                     human_aux=None if self.human_aux is None else self.human_aux[idx])


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: identity eq/hash (fields hold arrays)
class Dataset:
    """A loaded data set.

    Attributes:
      name: the :func:`load_dataset` name.
      train, test: the splits (``train`` possibly a stratified subset).
      num_primary: number of primary classes.
      psi_human: hierarchy of the human auxiliary task (``len == num_primary``), or ``None``.
      primary_names: ``num_primary`` class names.
      image_shape: ``(H, W, C)``.
    """

    name: str
    train: Split
    test: Split
    num_primary: int
    psi_human: tuple[int, ...] | None
    primary_names: tuple[str, ...]
    image_shape: tuple[int, int, int]


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def shared_data_dir() -> pathlib.Path | None:
    """The offline shared data folder: ``$MAXL_SHARED_DATA`` or ``<repo root>/../shared/data``.

    Returns the path if that directory exists, else ``None``.
    """
    env = os.environ.get(SHARED_DATA_ENV)
    path = pathlib.Path(env) if env else pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return path if path.is_dir() else None


def hierarchy_from_fine_to_primary(fine_to_primary: Sequence[int], num_primary: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Orders fine classes by (primary class, fine index) to build a ``psi`` hierarchy.

    Args:
      fine_to_primary: ``(F,)`` primary class of each fine class.
      num_primary: number of primary classes ``P``.

    Returns:
      ``(fine_to_aux, psi)``: int32 ``(F,)`` new index of each fine class, so that the fine classes of
      primary class ``i`` occupy ``[sum(psi[:i]), sum(psi[:i+1]))`` in ascending fine order; and ``psi``,
      a tuple of ``P`` counts.
    """
    f2p = np.asarray(fine_to_primary, dtype=np.int64)
    if f2p.ndim != 1 or (f2p.size and (f2p.min() < 0 or f2p.max() >= num_primary)):
        raise ValueError(f"fine_to_primary must be a 1-D map into [0, {num_primary}), got {f2p.tolist()}")
    order = np.lexsort((np.arange(f2p.size), f2p))  # sort by primary, then fine index
    fine_to_aux = np.empty(f2p.size, dtype=np.int32)
    fine_to_aux[order] = np.arange(f2p.size, dtype=np.int32)
    psi = tuple(int(c) for c in np.bincount(f2p, minlength=num_primary))
    return fine_to_aux, psi


def _cifar100_fine_to_primary(level: int) -> np.ndarray:
    """``(100,)`` primary class of each CIFAR-100 fine class at hierarchy level 20, 10 or 3."""
    f2p = np.asarray(CIFAR100_FINE_TO_COARSE, dtype=np.int64)
    if level <= 10:
        f2p = np.asarray(CIFAR100_COARSE20_TO_10)[f2p]
    if level <= 3:
        f2p = np.asarray(CIFAR10_TO_3)[f2p]
    return f2p


def _cifar100_primary_names(level: int) -> tuple[str, ...]:
    if level == 20:
        return CIFAR100_COARSE_NAMES
    c2p = np.asarray(CIFAR100_COARSE20_TO_10)
    if level == 3:
        c2p = np.asarray(CIFAR10_TO_3)[c2p]
    return tuple("+".join(CIFAR100_COARSE_NAMES[c] for c in range(20) if c2p[c] == p) for p in range(level))


_IDX_DTYPES = {0x08: np.uint8}


def read_idx_gz(path: str | os.PathLike, *, expected_ndim: int) -> np.ndarray:
    """Reads a gzip-compressed IDX file (as published for MNIST / Fashion-MNIST).

    Args:
      path: the ``.gz`` file.
      expected_ndim: 3 for an image file (magic ``0x00000803``), 1 for a label file (``0x00000801``).

    Returns:
      uint8 array of the shape in the IDX header.

    Raises:
      DatasetCorruptError: truncated gzip stream, bad magic number, or payload size mismatch (the
        message names the file).
    """
    path = pathlib.Path(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as err:
        raise DatasetCorruptError(f"{path}: cannot decompress IDX archive (truncated or corrupt gzip): {err}") from err
    expected_magic = 0x0800 | expected_ndim
    if len(raw) < 4:
        raise DatasetCorruptError(f"{path}: IDX file too short ({len(raw)} bytes) to hold a header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DatasetCorruptError(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(uint8 data, {expected_ndim} dimension(s))"
        )
    header = 4 + 4 * expected_ndim
    if len(raw) < header:
        raise DatasetCorruptError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_ndim))
    expected = header + math.prod(shape)
    if len(raw) != expected:
        raise DatasetCorruptError(
            f"{path}: IDX payload size mismatch: header says shape {shape} ({expected} bytes in all), "
            f"file holds {len(raw)} bytes (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx_dir(data_dir: str | os.PathLike | None, files: dict = FASHION_MNIST_FILES,
                  what: str = "Fashion-MNIST") -> pathlib.Path | None:
    """The folder holding all four IDX archives ``files`` (``data_dir`` or
    ``data_dir/downloads/manual``).

    Returns ``None`` if neither holds any of them; raises :class:`DatasetNotFoundError` if one holds
    only some of them.
    """
    if data_dir is None:
        return None
    names = [n for pair in files.values() for n in pair]
    for folder in (pathlib.Path(data_dir), pathlib.Path(data_dir) / "downloads" / "manual"):
        present = [n for n in names if (folder / n).is_file()]
        if len(present) == len(names):
            return folder
        if present:
            missing = sorted(set(names) - set(present))
            raise DatasetNotFoundError(
                f"{what} IDX archives incomplete in {folder}: found {present}, missing {missing}. "
                f"Put all four files {names} there."
            )
    return None


def _read_idx_pair(folder: pathlib.Path, img_name: str, lbl_name: str) -> tuple[np.ndarray, np.ndarray]:
    """One split's 28x28 images and labels from two IDX archives, checked against each other."""
    images = read_idx_gz(folder / img_name, expected_ndim=3)
    labels = read_idx_gz(folder / lbl_name, expected_ndim=1)
    if images.shape[1:] != (28, 28):
        raise DatasetCorruptError(f"{folder / img_name}: expected 28x28 images, header says {images.shape[1:]}")
    if labels.shape[0] != images.shape[0]:
        raise DatasetCorruptError(
            f"{folder / lbl_name}: {labels.shape[0]} labels for {images.shape[0]} images in {img_name}"
        )
    return images, labels


def load_fashion_mnist_idx(folder: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Parses the four Fashion-MNIST IDX archives in ``folder``.

    Returns:
      ``{"train": (images, labels), "test": (images, labels)}`` with images uint8 ``(N, 28, 28, 1)``
      and labels int32 ``(N,)`` in ``[0, 10)``.
    """
    folder = pathlib.Path(folder)
    out = {}
    for split, (img_name, lbl_name) in FASHION_MNIST_FILES.items():
        images, labels = _read_idx_pair(folder, img_name, lbl_name)
        if labels.size and labels.max() >= 10:
            raise DatasetCorruptError(f"{folder / lbl_name}: label {int(labels.max())} outside [0, 10)")
        out[split] = (images[..., None].copy(), labels.astype(np.int32))
    return out


def _emnist_layout(data_dir) -> tuple[str, pathlib.Path] | None:
    """``(layout, folder)`` of the EMNIST-letters archives under ``data_dir``, official names first."""
    for layout in ("official", "upright"):
        folder = _find_idx_dir(data_dir, EMNIST_LETTERS_FILES[layout], "EMNIST-letters")
        if folder is not None:
            return layout, folder
    return None


def load_emnist_letters_idx(folder: str | os.PathLike, layout: str = "upright"
                            ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Parses the four EMNIST-letters IDX archives in ``folder`` (file names and conventions of
    ``layout``, see :data:`EMNIST_LETTERS_FILES`).

    Returns:
      ``{"train": (images, labels), "test": (images, labels)}``: images uint8 ``(N, 28, 28, 1)``,
      upright (the official files' transposition undone), labels int32 ``(N,)`` in ``[0, 26)``.

    Raises:
      DatasetCorruptError: as :func:`read_idx_gz`, or labels outside the layout's range (``0..25``
      upright, ``1..26`` official: the message says which layout the file names imply).
    """
    if layout not in EMNIST_LETTERS_FILES:
        raise ValueError(f"layout={layout!r}; valid choices: {list(EMNIST_LETTERS_FILES)}")
    folder = pathlib.Path(folder)
    offset = 1 if layout == "official" else 0
    out = {}
    for split, (img_name, lbl_name) in EMNIST_LETTERS_FILES[layout].items():
        images, labels = _read_idx_pair(folder, img_name, lbl_name)
        labels = labels.astype(np.int32) - offset
        if labels.size and (labels.min() < 0 or labels.max() >= 26):
            raise DatasetCorruptError(
                f"{folder / lbl_name}: labels {int(labels.min()) + offset}..{int(labels.max()) + offset} "
                f"outside {offset}..{25 + offset}, the range of the {layout} layout (file names "
                f"{EMNIST_LETTERS_FILES[layout]['train'][0]}, ...): labels 0..25 belong under the "
                f"names {FASHION_MNIST_FILES['train'][0]}, ..., the official 1..26 under "
                f"{EMNIST_LETTERS_FILES['official']['train'][0]}, ...")
        if layout == "official":
            images = images.transpose(0, 2, 1)
        out[split] = (np.ascontiguousarray(images[..., None]), labels)
    return out


def _emnist_not_found(data_dir) -> str:
    up, off = EMNIST_LETTERS_FILES["upright"], EMNIST_LETTERS_FILES["official"]
    where = f"in {data_dir} (nor under its downloads/manual/)" if data_dir else "(no --config.data_dir given)"
    return (f"Dataset 'emnist_letters' not found {where}. It is read from four IDX archives, never "
            f"downloaded (the official release is one 536 MiB gzip.zip of every EMNIST split): get "
            f"gzip.zip from NIST's EMNIST page (https://www.nist.gov/itl/products-and-services/emnist-"
            f"dataset), unzip the four files {', '.join(n for p in off.values() for n in p)} into a "
            f"folder and pass it as --config.data_dir (they are read as they are: labels 1..26, "
            f"images transposed back upright). An upright copy named "
            f"{', '.join(n for p in up.values() for n in p)} with labels 0..25 is read too.")


def stratified_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Deterministic stratified subset: the same fraction of every class.

    Args:
      labels: int ``(N,)`` class labels to stratify by.
      fraction: in ``(0, 1]``; each class with ``n`` examples keeps ``max(1, round(fraction * n))``.
      seed: seeds the choice (numpy ``default_rng``).

    Returns:
      int64 ``(M,)`` sorted indices into ``labels``.
    """
    if fraction >= 1.0:
        return np.arange(labels.shape[0])
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(math.floor(fraction * idx.size + 0.5)))
        chosen.append(rng.permutation(idx)[:k])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros((0,), np.int64)


# ---------------------------------------------------------------------------------------------------
# TFDS reading
# ---------------------------------------------------------------------------------------------------


def _tfds_root(data_dir: str | os.PathLike | None) -> str:
    if data_dir is not None:
        return os.fspath(data_dir)
    from tensorflow_datasets.core import constants  # local import: TFDS is heavy

    return os.path.expanduser(constants.DATA_DIR)


def _not_found_message(name: str, tfds_name: str, data_dir, reason: str | None,
                       archives: Sequence = ()) -> str:
    root = _tfds_root(data_dir)
    msg = f"Dataset {name!r} not found in {root}."
    if archives:
        files = ", ".join(a.filename for a in archives)
        msg += (f" Provide it in one of these ways: run with network access and "
                f"--config.download=True (the default), which fetches the official archive"
                f"{'s' if len(archives) > 1 else ''} ({files}) into {root}/downloads and reads "
                f"{'them' if len(archives) > 1 else 'it'} without TensorFlow; or copy "
                f"{'them' if len(archives) > 1 else 'it'} there yourself from "
                f"{archives[0].url.rsplit('/', 1)[0]}/; or point --config.data_dir at a folder "
                f"holding {'them' if len(archives) > 1 else 'it'}")
        msg += (f"; or prepare the TFDS build: `tfds build {tfds_name} --data_dir {root} "
                f"--file_format array_record` (needs TensorFlow).")
    else:
        msg += (f" Prepare it with `tfds build {tfds_name} --data_dir {root} --file_format "
                f"array_record` (needs TensorFlow; reading does not).")
    if reason:
        msg += f" [{reason}]"
    return msg


def _read_all(source, keys: Sequence[str], chunk: int = 2048) -> dict[str, np.ndarray]:
    """Reads every record of a TFDS data source into stacked numpy arrays, one per feature key."""
    n = len(source)
    out: dict[str, np.ndarray] = {}
    for start in range(0, n, chunk):
        idx = list(range(start, min(n, start + chunk)))
        try:
            records = source.__getitems__(idx)
        except (AttributeError, TypeError):  # sources without a working batched read
            records = [source[i] for i in idx]
        for key in keys:
            vals = np.stack([np.asarray(r[key]) for r in records])
            if key not in out:
                out[key] = np.empty((n,) + vals.shape[1:], dtype=vals.dtype)
            out[key][start : start + len(idx)] = vals
    if n == 0:
        raise DatasetCorruptError(f"TFDS data source {source!r} is empty")
    return out


def _try_tfds(tfds_name: str, keys: Sequence[str], data_dir):
    """A prepared TFDS ``array_record`` build of ``tfds_name`` (read without TensorFlow), or
    ``None`` when there is none (TFDS then raises one of several errors, a ``KeyError`` among them
    with its default data dir)."""
    import tensorflow_datasets as tfds  # local import: TFDS is heavy

    try:
        sources = tfds.data_source(tfds_name, split=["train", "test"], data_dir=data_dir,
                                   download=False)
    except Exception:  # noqa: BLE001 - any failure here means "no usable build"
        return None
    return {split: _read_all(src, keys) for split, src in zip(("train", "test"), sources)}


def _archive_path(archive, data_dir) -> pathlib.Path | None:
    """Where an archive already lies: ``data_dir/<file>``, ``<root>/downloads/<file>`` or
    ``<root>/downloads/manual/<file>``."""
    root = pathlib.Path(_tfds_root(data_dir))
    for folder in (root, root / "downloads", root / "downloads" / "manual"):
        if (folder / archive.filename).is_file():
            return folder / archive.filename
    return None


def _fetch_archives(name: str, tfds_name: str, archives, data_dir, download: bool,
                    progress: bool = True) -> list[pathlib.Path]:
    """Every archive's verified local path, fetching the missing ones when ``download``."""
    from maxl_jax import download as dl

    paths = []
    for archive in archives:
        path = _archive_path(archive, data_dir)
        if path is not None:
            try:
                dl.verify(path, archive.sha256, archive.size)
            except dl.DownloadError as err:
                raise DatasetCorruptError(f"{err}. Delete it to download it again.") from None
            paths.append(path)
            continue
        if not download:
            raise DatasetNotFoundError(_not_found_message(
                name, tfds_name, data_dir, "download is off (--config.download=False)", archives))
        dest = pathlib.Path(_tfds_root(data_dir)) / "downloads" / archive.filename
        try:
            paths.append(dl.fetch(dl.url_of(archive), dest, archive.sha256, archive.size,
                                  progress=progress))
        except dl.DownloadError as err:
            raise DatasetNotFoundError(_not_found_message(name, tfds_name, data_dir, str(err),
                                                          archives)) from None
    return paths


def read_cifar_binary(archive: str | os.PathLike, name: str) -> dict[str, dict[str, np.ndarray]]:
    """Parses the official CIFAR binary archive (``cifar-10-binary.tar.gz``,
    ``cifar-100-binary.tar.gz``) without TensorFlow.

    Each record is its label byte(s) (CIFAR-100: coarse, then fine) and 3072 bytes of pixels, the
    red, green and blue 32x32 planes. Returns ``{"train"|"test": {"image": uint8 (N, 32, 32, 3),
    "label": int64 (N,)}}`` with the fine label (as TFDS's ``label``).
    """
    import tarfile

    n_labels = 2 if name == "cifar100" else 1
    members = ({"train": ["train.bin"], "test": ["test.bin"]} if name == "cifar100" else
               {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]})
    out = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            by_name = {pathlib.PurePosixPath(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for split, files in members.items():
                chunks = []
                for f in files:
                    if f not in by_name:
                        raise DatasetCorruptError(f"{archive}: no {f} inside (not the CIFAR binary "
                                                  f"archive?)")
                    chunks.append(tar.extractfile(by_name[f]).read())
                raw = np.frombuffer(b"".join(chunks), np.uint8)
                record = n_labels + 3072
                if raw.size % record:
                    raise DatasetCorruptError(f"{archive}: {split} holds {raw.size} bytes, not a "
                                              f"whole number of {record}-byte records")
                raw = raw.reshape(-1, record)
                out[split] = {"image": raw[:, n_labels:].reshape(-1, 3, 32, 32)
                              .transpose(0, 2, 3, 1).copy(),
                              "label": raw[:, n_labels - 1].astype(np.int64)}
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise DatasetCorruptError(f"{archive}: cannot read the archive ({err})") from None
    return out


# ---------------------------------------------------------------------------------------------------
# load_dataset
# ---------------------------------------------------------------------------------------------------


def _validate(name, primary_level, train_fraction, seed, eval_split="test", validation_size=0) -> int:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid choices: {list(DATASETS)}")
    levels = {"cifar100": _CIFAR100_LEVELS, "cifar10": (10,), "fashion_mnist": (10,), "fashion_mnist_coarse": (5,),
              "emnist_letters": (26,)}[name]
    if primary_level is None:
        primary_level = levels[0]
    if isinstance(primary_level, bool) or not isinstance(primary_level, (int, np.integer)) or primary_level not in levels:
        raise ValueError(f"primary_level={primary_level!r} is not valid for {name!r}; valid choices: {list(levels)} or None")
    try:
        ok = 0.0 < float(train_fraction) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"train_fraction={train_fraction!r} must be a number in (0, 1]")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed={seed!r} must be an int")
    if eval_split not in ("test", "validation"):
        raise ValueError(f"eval_split={eval_split!r}; valid choices: 'test', 'validation'")
    if eval_split == "validation":
        if float(train_fraction) >= 1.0:
            raise ValueError("eval_split='validation' draws the validation images from the training "
                             "images that train_fraction leaves unused, and train_fraction=1 leaves "
                             "none: lower train_fraction (e.g. 0.05) or evaluate on the test split")
        if (isinstance(validation_size, bool) or not isinstance(validation_size, (int, np.integer))
                or validation_size < 1):
            raise ValueError(f"validation_size={validation_size!r} must be a positive int")
    return int(primary_level)


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    primary_level: int | None = None,
    train_fraction: float = 1.0,
    seed: int = 0,
    download: bool = False,
    eval_split: str = "test",
    validation_size: int = 5000,
) -> Dataset:
    """Loads a data set into host memory.

    Args:
      name: one of :data:`DATASETS`:
        ``cifar100`` (primary: 20 superclasses, or 10 / 3 classes with ``primary_level``; human
        auxiliary task: the 100 fine classes), ``cifar10`` (10 classes, no human auxiliary task),
        ``fashion_mnist`` (10 classes, none), ``fashion_mnist_coarse`` (primary: 5 groups
        :data:`FASHION_MNIST_COARSE_GROUPS`; human auxiliary task: the 10 fine classes),
        ``emnist_letters`` (26 letters, each of both cases; none; read only from IDX archives, see
        :data:`EMNIST_LETTERS_FILES`, never downloaded).
      data_dir: TFDS data dir (default: TFDS's own, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
        For Fashion-MNIST it may instead be a folder holding the four IDX archives
        (:data:`FASHION_MNIST_FILES`), directly or under ``downloads/manual/``; for EMNIST-letters it
        must be such a folder.
      primary_level: ``cifar100`` only: 20 (default), 10 or 3. Others: ``None`` or their class count.
      train_fraction: in ``(0, 1]``: keep a stratified (per primary class), ``seed``-deterministic
        subset of the training split. The test split is always complete.
      seed: seed of the subset choice.
      download: fetch the official archive(s) when no TFDS build and no archive is found, into
        ``<data_dir or TFDS's>/downloads`` (resumable, checksum-verified; read without TensorFlow).
      eval_split: ``"test"``: the returned ``test`` split is the data set's test split.
        ``"validation"``: it is instead ``validation_size`` training images (stratified by primary
        class, drawn with ``seed``) from those the ``train_fraction`` subset leaves out, so that
        choices such as a training budget are made without looking at the test split. The training
        subset is the same as with ``"test"``. Needs ``train_fraction < 1``.
      validation_size: images in the validation split (at most the unused training images).

    Returns:
      A :class:`Dataset`; images uint8 ``(N, H, W, C)``, labels int32 ``(N,)``.

    Raises:
      ValueError: bad argument (the message names the value and the valid choices).
      DatasetNotFoundError: data absent (the message names the data set, the directory and the
        command that prepares it).
      DatasetCorruptError: an IDX archive is truncated or malformed.
    """
    level = _validate(name, primary_level, train_fraction, seed, eval_split, validation_size)

    from maxl_jax import download as dl

    if name in ("fashion_mnist", "fashion_mnist_coarse"):
        idx_dir = _find_idx_dir(data_dir)
        raw = None if idx_dir is not None else _try_tfds("fashion_mnist", ("image", "label"),
                                                         data_dir)
        if raw is None:
            if idx_dir is None:
                paths = _fetch_archives(name, "fashion_mnist", dl.FASHION_MNIST_ARCHIVES, data_dir,
                                        download)
                idx_dir = paths[0].parent
            raw = {s: {"image": im, "label": lb}
                   for s, (im, lb) in load_fashion_mnist_idx(idx_dir).items()}
    elif name == "emnist_letters":
        found = _emnist_layout(data_dir)
        if found is None:
            raise DatasetNotFoundError(_emnist_not_found(data_dir))
        raw = {s: {"image": im, "label": lb}
               for s, (im, lb) in load_emnist_letters_idx(found[1], found[0]).items()}
    else:
        raw = _try_tfds(name, ("image", "label"), data_dir)
        if raw is None:
            (path,) = _fetch_archives(name, name, [dl.ARCHIVES[name]], data_dir, download)
            raw = read_cifar_binary(path, name)

    if name == "cifar100":
        fine_to_primary = _cifar100_fine_to_primary(level)
        num_primary, names = level, _cifar100_primary_names(level)
    elif name == "fashion_mnist_coarse":
        fine_to_primary = np.asarray(FASHION_MNIST_FINE_TO_COARSE)
        num_primary, names = len(FASHION_MNIST_COARSE_GROUPS), FASHION_MNIST_COARSE_NAMES
    elif name == "emnist_letters":
        fine_to_primary = None
        num_primary, names = 26, EMNIST_LETTERS_NAMES
    else:
        fine_to_primary = None
        num_primary, names = 10, (CIFAR10_NAMES if name == "cifar10" else FASHION_MNIST_NAMES)

    if fine_to_primary is not None:
        fine_to_aux, psi = hierarchy_from_fine_to_primary(fine_to_primary, num_primary)
    else:
        fine_to_aux, psi = None, None

    splits = {}
    for split in ("train", "test"):
        images = np.ascontiguousarray(raw[split]["image"], dtype=np.uint8)
        fine = raw[split]["label"].astype(np.int64)
        num_fine = len(fine_to_primary) if fine_to_primary is not None else num_primary
        if fine.size and (fine.min() < 0 or fine.max() >= num_fine):
            raise DatasetCorruptError(f"{name} {split}: label outside [0, {num_fine})")
        if fine_to_primary is not None:
            # Primary labels are derived from the fine label through the standard map (on the real
            # CIFAR-100 this equals TFDS's `coarse_label`), so the hierarchy is always consistent.
            primary = fine_to_primary[fine].astype(np.int32)
            human_aux = fine_to_aux[fine].astype(np.int32)
        else:
            primary, human_aux = fine.astype(np.int32), None
        splits[split] = Split(images=images, primary=primary, human_aux=human_aux)

    if train_fraction < 1.0:
        full = splits["train"]
        keep = stratified_subset(full.primary, float(train_fraction), int(seed))
        if eval_split == "validation":  # drawn from the training images the subset leaves out
            unused = np.setdiff1d(np.arange(len(full)), keep)
            take = min(1.0, validation_size / max(1, unused.size))
            splits["test"] = full.subset(unused[stratified_subset(full.primary[unused], take,
                                                                  int(seed) + 104729)])
        splits["train"] = full.subset(keep)

    return Dataset(
        name=name,
        train=splits["train"],
        test=splits["test"],
        num_primary=num_primary,
        psi_human=psi,
        primary_names=tuple(names),
        image_shape=tuple(int(d) for d in splits["test"].images.shape[1:]),
    )


# ---------------------------------------------------------------------------------------------------
# On-device preprocessing (pure, jittable)
# ---------------------------------------------------------------------------------------------------

MEAN, STD = 0.5, 0.2  # reference normalisation, per channel


def normalize(images_uint8: jax.Array) -> jax.Array:
    """``(x / 255 - MEAN) / STD`` as float32; any shape (typically ``(B, H, W, C)``)."""
    x = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
    return (x - MEAN) / STD


def augment(key: jax.Array, images_uint8: jax.Array, *, pad: int = 4, flip: bool = True,
            valid: int | None = None) -> jax.Array:
    """Random crop from the zero-padded image + random horizontal flip, independently per image.

    Equivalent to torchvision ``RandomCrop(H, padding=pad)`` (fill 0 on raw pixels, i.e. before
    normalisation) followed by ``RandomHorizontalFlip(p=0.5)``.

    Args:
      key: PRNG key.
      images_uint8: ``(B, H, W, C)`` images (uint8 or float; the dtype is kept).
      pad: pixels of zero padding on each side; the crop offset is uniform in ``[0, 2*pad]`` per axis.
        ``pad=0`` disables cropping.
      flip: whether to flip horizontally with probability 0.5.
      valid: draw the random numbers for the first ``valid`` images only (a batch padded to a
        multiple of the device count): they then get the crops and flips the unpadded batch of
        ``valid`` images gets; the padding images are left as they are.

    Returns:
      ``(B, H, W, C)``, same dtype as the input.
    """
    x = jnp.asarray(images_uint8)
    b, h, w, c = x.shape
    n = b if valid is None else valid
    k_crop, k_flip = jax.random.split(key)
    if pad > 0:
        padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        # Drawn flat: XLA:CPU compiles threefry for N-d shapes far more slowly (see models.xavier).
        offsets = jax.random.randint(k_crop, (2 * n,), 0, 2 * pad + 1).reshape(n, 2)
        offsets = jnp.concatenate([offsets, jnp.full((b - n, 2), pad, offsets.dtype)])

        def crop(img, off):
            return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

        x = jax.vmap(crop)(padded, offsets)
    if flip:
        do_flip = jax.random.bernoulli(k_flip, 0.5, (n,))
        do_flip = jnp.concatenate([do_flip, jnp.zeros((b - n,), bool)])
        x = jnp.where(do_flip[:, None, None, None], x[:, :, ::-1, :], x)
    return x


def preprocess(key: jax.Array | None, images_uint8: jax.Array, *, train: bool,
               augment_train: bool = True, valid: int | None = None) -> jax.Array:
    """Training/eval input transform: ``normalize(augment(key, x))`` if ``train and augment_train``,
    else ``normalize(x)``. ``images_uint8``: ``(B, H, W, C)``; returns float32 ``(B, H, W, C)``.
    ``key`` may be ``None`` when no augmentation is applied; ``valid``: see ``augment``."""
    if train and augment_train:
        if key is None:
            raise ValueError("preprocess(train=True, augment_train=True) needs a PRNG key")
        images_uint8 = augment(key, images_uint8, valid=valid)
    return normalize(images_uint8)
