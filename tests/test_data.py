"""Tests of maxl_jax.data: loading (mocked TFDS, real Fashion-MNIST IDX), label hierarchies,
error messages, and the on-device preprocessing on real CIFAR-100 pixels."""

from __future__ import annotations

import gzip
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from maxl_jax import data as D

# Its module-scoped fixtures are computed once: its tests run in one worker under pytest-xdist.
pytestmark = pytest.mark.xdist_group("test_data")

# ---------------------------------------------------------------------------------------------------
# helpers / fixtures
# ---------------------------------------------------------------------------------------------------

_DEFAULT_SHARED = pathlib.Path(D.__file__).resolve().parents[1].parent / "shared" / "data"


def _shared_subdir(sub: str) -> pathlib.Path:
    root = D.shared_data_dir()
    if root is None or not (root / sub).is_dir():
        looked = os.environ.get(D.SHARED_DATA_ENV) or _DEFAULT_SHARED
        pytest.skip(
            f"real data {sub!r} absent from {looked}/{sub}: set ${D.SHARED_DATA_ENV} to the shared "
            f"data folder (default {_DEFAULT_SHARED})"
        )
    return root / sub


def _write_idx_gz(path: pathlib.Path, array: np.ndarray) -> None:
    """Writes a uint8 array as a gzip-compressed IDX file (magic 0x0800 | ndim, big-endian dims)."""
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _write_fmnist_idx(folder: pathlib.Path, train_labels: np.ndarray, test_labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, labels in (("train", train_labels), ("test", test_labels)):
        img_name, lbl_name = D.FASHION_MNIST_FILES[split]
        images = (np.arange(labels.size)[:, None, None] * 7 + np.zeros((1, 28, 28), np.int64)) % 256
        _write_idx_gz(folder / img_name, images.astype(np.uint8))
        _write_idx_gz(folder / lbl_name, labels.astype(np.uint8))


def _check_blocks(aux: np.ndarray, primary: np.ndarray, psi: tuple[int, ...]) -> None:
    """Every auxiliary label lies in the psi block of its primary class."""
    starts = np.concatenate([[0], np.cumsum(psi)])
    assert np.all(aux >= starts[primary]) and np.all(aux < starts[primary + 1])


@pytest.fixture(scope="module")
def fmnist_full():
    return D.load_dataset("fashion_mnist", data_dir=str(_shared_subdir("fashion_mnist")))


@pytest.fixture(scope="module")
def cifar_sample():
    """The 20 real CIFAR-100 test PNGs: (images uint8 (20, 32, 32, 3), fine labels (20,))."""
    from PIL import Image

    folder = _shared_subdir("cifar100_test_sample")
    files = sorted(folder.glob("cifar100_*_*.png"), key=lambda p: int(p.stem.split("_")[1]))
    assert len(files) == 20, files
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    fine = np.array([int(p.stem.split("_")[2]) for p in files])
    return images, fine


# ---------------------------------------------------------------------------------------------------
# label tables
# ---------------------------------------------------------------------------------------------------

# The official CIFAR-100 superclass table, written by name, independent of the index map under test.
_CIFAR100_SUPERCLASSES = {
    "aquatic_mammals": "beaver dolphin otter seal whale",
    "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip",
    "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman",
    "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train",
    "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}


def test_cifar100_fine_to_coarse_is_the_standard_20x5_partition():
    """The fine->coarse map is a partition into 20 blocks of 5 and agrees with the official
    superclass table by name; spot values: mountain 49 -> 10, forest 33 -> 10, seal 72 -> 0."""
    f2c = np.asarray(D.CIFAR100_FINE_TO_COARSE)
    assert f2c.shape == (100,)
    assert np.array_equal(np.bincount(f2c, minlength=20), [5] * 20)
    assert list(D.CIFAR100_FINE_NAMES) == sorted(D.CIFAR100_FINE_NAMES)  # CIFAR orders fine names alphabetically
    for fine, coarse in enumerate(f2c):
        members = _CIFAR100_SUPERCLASSES[D.CIFAR100_COARSE_NAMES[coarse]].split()
        assert D.CIFAR100_FINE_NAMES[fine] in members, (fine, D.CIFAR100_FINE_NAMES[fine], coarse)
    assert (f2c[49], f2c[33], f2c[72]) == (10, 10, 0)
    assert D.CIFAR100_FINE_NAMES[49] == "mountain" and D.CIFAR100_FINE_NAMES[72] == "seal"


def test_cifar100_coarser_tables_are_onto():
    """The reference 20->10 and 10->3 tables map onto every coarser class."""
    assert len(D.CIFAR100_COARSE20_TO_10) == 20 and set(D.CIFAR100_COARSE20_TO_10) == set(range(10))
    assert len(D.CIFAR10_TO_3) == 10 and set(D.CIFAR10_TO_3) == set(range(3))
    assert D.CIFAR100_COARSE20_TO_10[10] == 8 and D.CIFAR10_TO_3[8] == 2  # spot values from the reference


def test_fashion_mnist_coarse_grouping_is_the_documented_table(tmp_path):
    """Loading fashion_mnist_coarse maps fine labels 0..9 to tops{0,2,4,6}=0, trouser{1}=1, dress{3}=2,
    footwear{5,7,9}=3, bag{8}=4, and re-indexes the fine labels into hierarchy order."""
    fine = np.arange(10)
    _write_fmnist_idx(tmp_path, fine, fine[::-1])
    ds = D.load_dataset("fashion_mnist_coarse", data_dir=str(tmp_path))
    assert np.array_equal(ds.train.primary, [0, 1, 0, 2, 0, 3, 0, 3, 4, 3])
    assert np.array_equal(ds.train.human_aux, [0, 4, 1, 5, 2, 6, 3, 7, 9, 8])
    assert np.array_equal(ds.test.primary, [0, 1, 0, 2, 0, 3, 0, 3, 4, 3][::-1])
    assert ds.psi_human == (4, 1, 1, 3, 1)
    assert ds.primary_names == ("tops", "trouser", "dress", "footwear", "bag")
    assert ds.train.primary.dtype == np.int32 and ds.train.human_aux.dtype == np.int32
    _check_blocks(ds.train.human_aux, ds.train.primary, ds.psi_human)


# ---------------------------------------------------------------------------------------------------
# loading through tfds.data_source (mocked)
# ---------------------------------------------------------------------------------------------------

_MOCK_CASES = [
    # name, level, num_primary, image shape, number of human aux classes (None: no human aux task)
    ("cifar100", None, 20, (32, 32, 3), 100),
    ("cifar100", 10, 10, (32, 32, 3), 100),
    ("cifar100", 3, 3, (32, 32, 3), 100),
    ("cifar10", None, 10, (32, 32, 3), None),
    ("fashion_mnist", None, 10, (28, 28, 1), None),
    ("fashion_mnist_coarse", None, 5, (28, 28, 1), 10),
]


@pytest.mark.parametrize("name,level,num_primary,shape,num_aux", _MOCK_CASES)
def test_load_through_mocked_tfds(tmp_path, name, level, num_primary, shape, num_aux):
    """With TFDS mocked, every data set loads with the right shapes, dtypes and label ranges;
    psi_human sums to the number of auxiliary classes and every human-aux label lies in its primary
    class's block (CIFAR-100 at levels 20, 10 and 3)."""
    n = 64
    with tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = D.load_dataset(name, data_dir=str(tmp_path), primary_level=level)
    assert ds.name == name and ds.num_primary == num_primary and ds.image_shape == shape
    assert len(ds.primary_names) == num_primary
    for split in (ds.train, ds.test):
        assert len(split) == n
        assert split.images.shape == (n, *shape) and split.images.dtype == np.uint8
        assert split.primary.dtype == np.int32
        assert split.primary.min() >= 0 and split.primary.max() < num_primary
        if num_aux is None:
            assert split.human_aux is None
        else:
            assert split.human_aux.dtype == np.int32
            assert split.human_aux.min() >= 0 and split.human_aux.max() < num_aux
            _check_blocks(split.human_aux, split.primary, ds.psi_human)
    if num_aux is None:
        assert ds.psi_human is None
    else:
        assert len(ds.psi_human) == num_primary and sum(ds.psi_human) == num_aux
    if name == "cifar100":
        # psi is the number of fine classes per primary class, from the composed tables
        f2p = np.asarray(D.CIFAR100_FINE_TO_COARSE)
        if num_primary <= 10:
            f2p = np.asarray(D.CIFAR100_COARSE20_TO_10)[f2p]
        if num_primary == 3:
            f2p = np.asarray(D.CIFAR10_TO_3)[f2p]
        assert ds.psi_human == tuple(np.bincount(f2p, minlength=num_primary))
        if num_primary == 20:
            assert ds.psi_human == (5,) * 20


def test_cifar100_hierarchy_reindexing_is_consistent():
    """hierarchy_from_fine_to_primary gives a permutation of the 100 fine classes that places the
    fine classes of each primary class in its block, in ascending fine order."""
    for level, f2p in ((20, D._cifar100_fine_to_primary(20)), (3, D._cifar100_fine_to_primary(3))):
        f2a, psi = D.hierarchy_from_fine_to_primary(f2p, level)
        assert sorted(f2a.tolist()) == list(range(100))
        _check_blocks(f2a, f2p, psi)
        for p in range(level):
            members = np.flatnonzero(f2p == p)
            assert np.all(np.diff(f2a[members]) == 1)  # contiguous, ascending fine index


# ---------------------------------------------------------------------------------------------------
# real Fashion-MNIST from the IDX archives
# ---------------------------------------------------------------------------------------------------


def test_real_fashion_mnist_full(fmnist_full):
    """The four real IDX archives give 60,000 / 10,000 28x28x1 uint8 images, 6,000 train per class."""
    ds = fmnist_full
    assert ds.train.images.shape == (60000, 28, 28, 1) and ds.test.images.shape == (10000, 28, 28, 1)
    assert ds.train.images.dtype == np.uint8 and ds.image_shape == (28, 28, 1)
    assert np.array_equal(np.bincount(ds.train.primary, minlength=10), [6000] * 10)
    assert np.array_equal(np.bincount(ds.test.primary, minlength=10), [1000] * 10)
    assert ds.train.images.max() == 255 and ds.train.images.min() == 0
    assert ds.psi_human is None and ds.train.human_aux is None


def test_real_fashion_mnist_stratified_5_percent(fmnist_full):
    """5% stratified subset: 3,000 images, 300 per class, a subset of the full training set,
    identical for the same seed, different for another seed; the test split is untouched."""
    d = str(_shared_subdir("fashion_mnist"))
    a = D.load_dataset("fashion_mnist", data_dir=d, train_fraction=0.05, seed=0)
    b = D.load_dataset("fashion_mnist", data_dir=d, train_fraction=0.05, seed=0)
    c = D.load_dataset("fashion_mnist", data_dir=d, train_fraction=0.05, seed=1)
    assert len(a.train) == 3000 and len(a.test) == 10000
    assert np.array_equal(np.bincount(a.train.primary, minlength=10), [300] * 10)
    assert np.array_equal(a.train.images, b.train.images) and np.array_equal(a.train.primary, b.train.primary)
    assert not np.array_equal(a.train.images, c.train.images)
    # every subset image is a training image with the same label (match on raw bytes)
    full = {img.tobytes(): lbl for img, lbl in zip(fmnist_full.train.images, fmnist_full.train.primary)}
    assert all(full.get(img.tobytes()) == lbl for img, lbl in zip(a.train.images[:200], a.train.primary[:200]))


def test_real_fashion_mnist_coarse_under_manual_dir(tmp_path):
    """The archives are also found under <data_dir>/downloads/manual/ (symlinks to the real files);
    the coarse task has 24,000/6,000/6,000/18,000/6,000 training images per group."""
    src = _shared_subdir("fashion_mnist")
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    for pair in D.FASHION_MNIST_FILES.values():
        for n in pair:
            (manual / n).symlink_to(src / n)
    ds = D.load_dataset("fashion_mnist_coarse", data_dir=str(tmp_path))
    assert np.array_equal(np.bincount(ds.train.primary), [24000, 6000, 6000, 18000, 6000])
    assert np.array_equal(np.bincount(ds.train.human_aux), [6000] * 10)
    _check_blocks(ds.test.human_aux, ds.test.primary, ds.psi_human)


# ---------------------------------------------------------------------------------------------------
# real CIFAR-100 pixels through the preprocessing
# ---------------------------------------------------------------------------------------------------


def test_cifar_sample_coarse_labels(cifar_sample):
    """The coarse labels of the first 20 CIFAR-100 test images follow the fine->coarse map."""
    _, fine = cifar_sample
    coarse = np.asarray(D.CIFAR100_FINE_TO_COARSE)[fine]
    assert fine[:3].tolist() == [49, 33, 72]
    assert coarse.tolist() == [10, 10, 0, 4, 10, 2, 11, 7, 10, 4, 10, 12, 19, 19, 5, 8, 2, 8, 2, 4]


def test_normalize_on_real_pixels(cifar_sample):
    """normalize gives float32 (x/255 - 0.5)/0.2, in [-2.5, 2.5], same shape."""
    images, _ = cifar_sample
    y = np.asarray(D.normalize(jnp.asarray(images)))
    assert y.dtype == np.float32 and y.shape == images.shape
    np.testing.assert_allclose(y, (images / 255.0 - 0.5) / 0.2, rtol=1e-6, atol=1e-6)
    assert y.min() >= -2.5 - 1e-6 and y.max() <= 2.5 + 1e-6


def test_preprocess_train_and_eval(cifar_sample):
    """preprocess(train=True) == normalize(augment(same key)), reproducible for a key, different across
    keys; preprocess(train=False) and augment_train=False are plain normalisation; all jittable."""
    images = jnp.asarray(cifar_sample[0])
    k1, k2 = jax.random.key(1), jax.random.key(2)
    f = jax.jit(lambda k, x: D.preprocess(k, x, train=True))
    a, a2, b = f(k1, images), f(k1, images), f(k2, images)
    assert a.dtype == jnp.float32 and a.shape == images.shape
    assert float(a.min()) >= -2.5 - 1e-6 and float(a.max()) <= 2.5 + 1e-6
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(a, D.normalize(D.augment(k1, images)), atol=1e-6)
    np.testing.assert_array_equal(D.preprocess(None, images, train=False), D.normalize(images))
    np.testing.assert_array_equal(D.preprocess(k1, images, train=True, augment_train=False), D.normalize(images))
    # eager and jitted augment agree and keep the dtype
    aug = D.augment(k1, images)
    assert aug.dtype == jnp.uint8
    np.testing.assert_array_equal(aug, jax.jit(D.augment)(k1, images))


def test_augment_flip_only_is_mirror(cifar_sample):
    """With pad=0 each image is either unchanged or exactly its left-right mirror, chosen per image
    (both occur among 20 images)."""
    images = cifar_sample[0]
    out = np.asarray(D.augment(jax.random.key(3), jnp.asarray(images), pad=0, flip=True))
    flipped = []
    for x, y in zip(images, out):
        is_mirror, is_same = np.array_equal(y, x[:, ::-1]), np.array_equal(y, x)
        assert is_mirror or is_same
        flipped.append(is_mirror)
    assert 0 < sum(flipped) < len(flipped)
    # no-op settings return the input
    np.testing.assert_array_equal(D.augment(jax.random.key(3), jnp.asarray(images), pad=0, flip=False), images)


def test_augment_crop_is_window_of_zero_padded_image(cifar_sample):
    """Crop-only augmentation equals a 32x32 window of the image zero-padded by 4 (raw pixel 0, i.e.
    before normalisation) at an offset in [0, 8]^2, with offsets varying across images."""
    images = cifar_sample[0]
    pad = 4
    out = np.asarray(D.augment(jax.random.key(4), jnp.asarray(images), pad=pad, flip=False))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = []
    for p, y in zip(padded, out):
        hits = [(i, j) for i in range(2 * pad + 1) for j in range(2 * pad + 1) if np.array_equal(p[i : i + 32, j : j + 32], y)]
        assert hits, "crop is not a window of the zero-padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 1
    # combined crop + flip: each output is a window of the padded image or of its mirror
    both = np.asarray(D.augment(jax.random.key(5), jnp.asarray(images)))
    for p, y in zip(padded, both):
        assert any(
            np.array_equal(q[i : i + 32, j : j + 32], y)
            for q in (p, p[:, ::-1])
            for i in range(2 * pad + 1)
            for j in range(2 * pad + 1)
        )


# ---------------------------------------------------------------------------------------------------
# errors and validation
# ---------------------------------------------------------------------------------------------------


def test_truncated_idx_archive_raises_naming_the_file(tmp_path):
    """A truncated gzip stream, a bad magic number and a short payload each raise DatasetCorruptError
    naming the file."""
    labels = np.arange(10) % 10
    _write_fmnist_idx(tmp_path, labels, labels)
    img = tmp_path / D.FASHION_MNIST_FILES["train"][0]
    raw = img.read_bytes()
    img.write_bytes(raw[: len(raw) // 2])  # truncated gzip
    with pytest.raises(D.DatasetCorruptError, match=re.escape(str(img))):
        D.load_dataset("fashion_mnist", data_dir=str(tmp_path))

    _write_idx_gz(img, np.zeros((10, 28, 28), np.uint8))
    lbl = tmp_path / D.FASHION_MNIST_FILES["train"][1]
    with gzip.open(lbl, "wb") as f:  # image magic in a label file
        f.write((0x0803).to_bytes(4, "big") + (10).to_bytes(4, "big") + bytes(10))
    with pytest.raises(D.DatasetCorruptError, match="magic") as info:
        D.load_dataset("fashion_mnist", data_dir=str(tmp_path))
    assert str(lbl) in str(info.value)

    with gzip.open(lbl, "wb") as f:  # header says 10 labels, payload holds 7
        f.write((0x0801).to_bytes(4, "big") + (10).to_bytes(4, "big") + bytes(7))
    with pytest.raises(D.DatasetCorruptError, match="size mismatch") as info:
        D.load_dataset("fashion_mnist", data_dir=str(tmp_path))
    assert str(lbl) in str(info.value)


def test_incomplete_idx_set_raises(tmp_path):
    """Only some of the four archives present: DatasetNotFoundError listing the missing ones."""
    labels = np.arange(10)
    _write_fmnist_idx(tmp_path, labels, labels)
    (tmp_path / D.FASHION_MNIST_FILES["test"][1]).unlink()
    with pytest.raises(D.DatasetNotFoundError, match=re.escape(D.FASHION_MNIST_FILES["test"][1])):
        D.load_dataset("fashion_mnist_coarse", data_dir=str(tmp_path))


@pytest.mark.parametrize("name,tfds_name", [("cifar100", "cifar100"), ("cifar10", "cifar10"), ("fashion_mnist_coarse", "fashion_mnist")])
def test_missing_dataset_raises_clear_error(tmp_path, name, tfds_name):
    """Absent data without download: DatasetNotFoundError (a FileNotFoundError) naming the data set,
    the directory, the official archives to put there, the flag that fetches them and the `tfds
    build` command."""
    missing = tmp_path / "no_data_here"
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_dataset(name, data_dir=str(missing))
    assert isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    assert name in msg and str(missing) in msg
    assert f"tfds build {tfds_name} --data_dir {missing} --file_format array_record" in msg
    assert "--config.download=True" in msg and f"{missing}/downloads" in msg
    archive = {"cifar100": "cifar-100-binary.tar.gz", "cifar10": "cifar-10-binary.tar.gz",
               "fashion_mnist": "train-images-idx3-ubyte.gz"}[tfds_name]
    assert archive in msg


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(name="imagenet"), "unknown dataset 'imagenet'.*cifar100"),
        (dict(name="cifar100", primary_level=5), r"primary_level=5.*\[20, 10, 3\]"),
        (dict(name="cifar10", primary_level=20), r"primary_level=20.*\[10\]"),
        (dict(name="cifar100", train_fraction=0.0), r"train_fraction=0.0.*\(0, 1\]"),
        (dict(name="cifar100", train_fraction=1.5), r"train_fraction=1.5"),
        (dict(name="cifar100", train_fraction=float("nan")), r"train_fraction=nan"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, pattern):
    """Bad names, levels and fractions raise ValueError naming the value and the valid choices
    (before any data is touched)."""
    with pytest.raises(ValueError, match=pattern):
        D.load_dataset(data_dir="/nonexistent", **kwargs)


def test_stratified_subset_keeps_every_class():
    """Each class keeps round(fraction * n) examples, at least one; fraction 1 keeps everything."""
    labels = np.repeat(np.arange(4), [100, 10, 1, 0 + 5])
    idx = D.stratified_subset(labels, 0.05, seed=0)
    assert np.array_equal(np.bincount(labels[idx], minlength=4), [5, 1, 1, 1])
    assert np.array_equal(D.stratified_subset(labels, 1.0, seed=0), np.arange(labels.size))


def test_shared_data_dir_follows_env(monkeypatch, tmp_path):
    """shared_data_dir returns $MAXL_SHARED_DATA when it exists and None when it does not."""
    monkeypatch.setenv(D.SHARED_DATA_ENV, str(tmp_path))
    assert D.shared_data_dir() == tmp_path
    monkeypatch.setenv(D.SHARED_DATA_ENV, str(tmp_path / "absent"))
    assert D.shared_data_dir() is None


# ---------------------------------------------------------------------------------------------------
# EMNIST-letters and the validation split
# ---------------------------------------------------------------------------------------------------


def _write_emnist(folder: pathlib.Path, layout: str, images: dict, labels: dict) -> None:
    """Writes upright ``images`` / 0-based ``labels`` per split in ``layout``'s names and conventions
    (official: images transposed, labels 1..26)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (img_name, lbl_name) in D.EMNIST_LETTERS_FILES[layout].items():
        im, lb = images[split], labels[split]
        if layout == "official":
            im, lb = im.transpose(0, 2, 1), lb + 1
        _write_idx_gz(folder / img_name, im)
        _write_idx_gz(folder / lbl_name, lb.astype(np.uint8))


def _letters(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            np.arange(n, dtype=np.int64) % 26)


def test_emnist_official_and_upright_layouts_read_the_same(tmp_path):
    """The official files (labels 1..26, images transposed) and an upright copy (labels 0..25) give
    the same upright images and 0-based labels; 26 classes named A..Z, no human auxiliary task."""
    (tr, trl), (te, tel) = _letters(52, 0), _letters(26, 1)
    images, labels = {"train": tr, "test": te}, {"train": trl, "test": tel}
    _write_emnist(tmp_path / "up", "upright", images, labels)
    _write_emnist(tmp_path / "off", "official", images, labels)
    up = D.load_dataset("emnist_letters", data_dir=str(tmp_path / "up"))
    off = D.load_dataset("emnist_letters", data_dir=str(tmp_path / "off"))
    for ds in (up, off):
        assert ds.num_primary == 26 and ds.psi_human is None and ds.primary_names[25] == "Z"
        np.testing.assert_array_equal(ds.train.images[..., 0], tr)
        np.testing.assert_array_equal(ds.train.primary, trl)
        np.testing.assert_array_equal(ds.test.images[..., 0], te)
        assert ds.image_shape == (28, 28, 1) and ds.train.primary.dtype == np.int32


def test_emnist_labels_outside_the_layout_are_refused(tmp_path):
    """Official-format labels (1..26) under the upright names are refused, naming the file and the
    names the labels belong under."""
    (tr, trl), (te, tel) = _letters(26, 0), _letters(26, 1)
    _write_emnist(tmp_path, "upright", {"train": tr, "test": te}, {"train": trl + 1, "test": tel})
    with pytest.raises(D.DatasetCorruptError, match=r"train-labels-idx1-ubyte.gz: labels 1..26 "
                       r"outside 0..25.*emnist-letters-train-images-idx3-ubyte.gz"):
        D.load_dataset("emnist_letters", data_dir=str(tmp_path))


def test_emnist_missing_raises_clear_error(tmp_path):
    """No EMNIST archives: DatasetNotFoundError naming the folder, the four official files and
    --config.data_dir (the data set is never downloaded)."""
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_dataset("emnist_letters", data_dir=str(tmp_path), download=True)
    msg = str(info.value)
    assert str(tmp_path) in msg and "--config.data_dir" in msg and "never downloaded" in msg
    for pair in D.EMNIST_LETTERS_FILES["official"].values():
        assert all(name in msg for name in pair)


@pytest.fixture(scope="module")
def emnist_full():
    return D.load_dataset("emnist_letters", data_dir=str(_shared_subdir("emnist_letters")))


def test_real_emnist_letters(emnist_full):
    """The real files: 124,800 / 20,800 28x28x1 images, 4,800 / 800 per letter, the official order
    (train interleaved, starting W G P O W Q; test sorted by class)."""
    ds = emnist_full
    assert ds.train.images.shape == (124_800, 28, 28, 1) and ds.test.images.shape == (20_800, 28, 28, 1)
    assert np.array_equal(np.bincount(ds.train.primary), [4800] * 26)
    assert np.array_equal(np.bincount(ds.test.primary), [800] * 26)
    assert "".join(ds.primary_names[c] for c in ds.train.primary[:6]) == "WGPOWQ"
    assert np.all(np.diff(ds.test.primary) >= 0)


def test_real_emnist_letters_are_upright(emnist_full):
    """Orientation, from the letters' shapes in the class means: I is a vertical stroke (its ink
    concentrated in few columns, not in few rows), L has more ink at the bottom and on the left,
    T more at the top. A transposed or flipped reading fails at least one of these."""
    x, y = emnist_full.train.images[..., 0].astype(np.float64), emnist_full.train.primary

    def mean_of(letter):
        return x[y == ord(letter) - ord("A")].mean(0)

    def concentration(profile):
        return float(((profile / profile.sum()) ** 2).sum())

    i = mean_of("I")
    assert concentration(i.sum(0)) > 1.5 * concentration(i.sum(1))
    ell = mean_of("L")
    assert ell[14:].sum() > 1.2 * ell[:14].sum() and ell[:, :14].sum() > 1.1 * ell[:, 14:].sum()
    t = mean_of("T")
    assert t[:14].sum() > 1.3 * t[14:].sum()


def test_validation_split_is_drawn_from_the_unused_training_images(tmp_path):
    """eval_split='validation': the training subset is the one eval_split='test' gives; the
    validation images are training images outside it, stratified; train_fraction=1 is refused."""
    labels = np.repeat(np.arange(10), 100)
    _write_fmnist_idx(tmp_path, labels, np.arange(10))
    index = np.zeros((1000, 28, 28), np.uint8)  # each training image's first two pixels: its index
    index[:, 0, 0], index[:, 0, 1] = np.arange(1000) // 256, np.arange(1000) % 256
    _write_idx_gz(tmp_path / D.FASHION_MNIST_FILES["train"][0], index)
    kw = dict(data_dir=str(tmp_path), train_fraction=0.1, seed=3)
    test = D.load_dataset("fashion_mnist", **kw)
    val = D.load_dataset("fashion_mnist", eval_split="validation", validation_size=200, **kw)
    np.testing.assert_array_equal(test.train.images, val.train.images)

    def ids(split):
        return set(256 * split.images[:, 0, 0, 0].astype(int) + split.images[:, 0, 1, 0])

    assert len(ids(val.test)) == 200 and not ids(test.train) & ids(val.test)
    assert np.array_equal(np.bincount(val.test.primary, minlength=10), [20] * 10)
    with pytest.raises(ValueError, match="train_fraction=1 leaves none"):
        D.load_dataset("fashion_mnist", data_dir=str(tmp_path), eval_split="validation")
