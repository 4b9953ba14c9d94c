"""Datasets as in-memory uint8 tensors (N, C, H, W) with labels, plus normalisation.

Small image datasets fit in memory (CIFAR-10 is 150 MB as uint8), so batches are gathered
by index from tensors: no per-example Python in the DP hot path, and Poisson sampling is
exact. Sources: scikit-learn's digits (built in, no download: the quickstart), CIFAR-10/100
through torchvision, the npz array format (`x` uint8 NHWC, `y`) of ../shared/data, and
ImageNet-layout folders (torchvision `ImageFolder`), decoded and resized when a batch is drawn
(they need not fit in memory; `dpwa.loader` decodes them in worker processes). A subset of the
classes can be kept (`data.classes`), e.g. to split a dataset into a public and a private part.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from accounting import fingerprint

from .config import ConfigError, DataConfig
from .errors import RefusalError

__all__ = ["Split", "Withheld", "ImageFiles", "Data", "Source", "load_data", "register_source", "DataError", "PrivateDataAccess"]


class DataError(ConfigError):
    """The data cannot be found or read; the message names `data.root`."""


@dataclass
class Split:
    x: torch.Tensor  # uint8 (N, C, H, W); float features with data.features; ImageFiles (decoded on indexing)
    y: torch.Tensor  # int64 (N,)
    # With data.test_time_flip and fixed features: the features of the mirrored images (val and
    # test only); images without features are mirrored as they are evaluated.
    mirror: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.y)


HELD_OUT = "accuracy on examples held out of the private training data"


def carve_outside(cfg: DataConfig) -> dict[str, str]:
    """{flag: what} for a validation split carved by `data.val_carve=permutation`, else {}: the
    mechanisms that read it or the training split assume neighbouring data gives neighbouring
    splits, which this carve does not give (`carve`), so what a private run or a charged query
    releases from them is listed (and warned) outside the guarantee."""
    if not (cfg.val_size > 0 and cfg.val_carve == "permutation"):
        return {}
    return {"data.val_carve=permutation": "the choice of the validation split (a seeded shuffle of the whole source, "
                                          "which one example more reshuffles; the guarantee holds for the split "
                                          "taken as fixed)"}


def outside_guarantee(what: str, measured: str = HELD_OUT) -> str:
    """The warning for what is measured on private examples without the mechanism: the
    validation split's (its examples come from the private source, which the ledger's
    fingerprint covers, but are held out of DP training) or the private batches' own
    diagnostics. Neither has DP protection."""
    return f"{what}: {measured} is not covered by the DP guarantee; use it to tune locally, do not publish it"


class PrivateDataAccess(RefusalError, RuntimeError):
    """Something tried to read private training data where only released iterates may be
    used: refused (exit 1), nothing read."""


class Withheld(Split):
    """Stands in for the private training split where no code may read it (`dpwa eval`):
    its size is known, any access to its examples or labels raises."""

    def __init__(self, size: int) -> None:  # no dataclass fields set: x and y stay unreadable
        self._size = size

    def __len__(self) -> int:
        return self._size

    def __getattribute__(self, name: str):
        if name in ("x", "y"):
            raise PrivateDataAccess(f"private training data ({name}) is withheld here: only the released iterates "
                                    "may be used after training (design rule 1)")
        return super().__getattribute__(name)


@dataclass(frozen=True)
class Source:
    """The whole private source (train + val, before any class subset) as the ledger knows it:
    the fingerprint of its labels and its size. Only these are kept, not the labels, so that
    code after training (where the training split is `Withheld`) cannot read them."""

    fingerprint: str
    size: int
    # `content_digest` of the source in order, when asked for (`load_data(digest=True)`: the
    # ranks of a multi-node run agree on it, so that they index one dataset the same way)
    content: Optional[str] = None


def content_digest(split: Split) -> str:
    """SHA-256 of a split's labels and examples, in order: the pixels as loaded (before any
    fixed features, which another machine may compute with other rounding), or the files'
    paths below the split's folder. Two copies whose labels agree but whose examples sit in
    other orders differ here."""
    h = hashlib.sha256(split.y.contiguous().numpy().tobytes())
    if isinstance(split.x, ImageFiles):
        h.update("\n".join(split.x.names()).encode())
    else:
        h.update(split.x.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Data:
    name: str
    train: Split
    test: Split
    val: Optional[Split]
    mean: torch.Tensor   # per channel, in [0, 1] units: public (data.mean or a published constant)
    std: torch.Tensor
    num_classes: int
    source: "Source"  # the private source's identity in the ledger (its labels are not kept)
    features: str = "none"     # with fixed features (dpwa.features), x holds them as float, already normalised
    test_time_flip: bool = False  # data.test_time_flip: val / test predictions average the mirror image's

    def mirrored(self, split: Split, x: torch.Tensor, start: int) -> Optional[torch.Tensor]:
        """The mirror images of `x` = split.x[start:start + len(x)] as the model reads them, or
        None where no test-time flip applies (off, or a split other than val / test)."""
        if not self.test_time_flip or not (split is self.test or split is self.val):
            return None
        if self.features != "none":
            return split.mirror[start:start + len(x)]
        return torch.flip(x, dims=[-1])

    @property
    def in_channels(self) -> int:
        return self.test.x.shape[1]

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) -> float, per-channel standardised (features pass through)."""
        if self.features != "none":
            return x_uint8
        shape = (1,) * (x_uint8.dim() - 3) + (-1, 1, 1)
        return (x_uint8.float().div_(255.0) - self.mean.view(shape)) / self.std.view(shape)


def _from_nhwc(x: np.ndarray) -> torch.Tensor:
    if x.dtype != np.uint8 or x.ndim != 4:
        raise DataError(f"Expected images as uint8 (N, H, W, C), got {x.dtype} {x.shape}")
    if x.shape[-1] not in (1, 3, 4):  # e.g. (N, C, H, W), which would load as C-channel images of width H
        raise DataError(f"Expected images as uint8 (N, H, W, C) with C = 1, 3 or 4 channels last, got shape "
                        f"{x.shape}; a (N, C, H, W) array is x.transpose(0, 2, 3, 1)")
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _digits() -> tuple[Split, Split, int]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(d.images * 16, 0, 255).astype(np.uint8)[:, None]  # 0..16 -> 0..255, (N, 1, 8, 8)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))  # fixed public split: 1497 train, 300 test
    tr, te = order[300:], order[:300]
    return (Split(torch.from_numpy(x[tr]), torch.from_numpy(y[tr])),
            Split(torch.from_numpy(x[te]), torch.from_numpy(y[te])), 10)


def _npz(root: str) -> tuple[Split, Split, int]:
    folder = Path(root).expanduser()
    out = []
    for part in ("train", "test"):
        path = folder / f"{part}.npz"
        if not path.is_file():
            raise DataError(f"data.root={root!r}: {path} does not exist (expected train.npz and test.npz with "
                            "'x' uint8 NHWC and 'y')")
        try:
            with np.load(path, allow_pickle=False) as f:
                x, y = f["x"], f["y"]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"data.root={root!r}: cannot read {path}: {e}") from None
        # checked before anything is reserved: a mismatch found by a step would crash in it, naming
        # an index the secret batch drew, with the run reserved
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
            raise DataError(f"data.root={root!r}: {path} needs 'y' as one integer label >= 0 per image of 'x'; "
                            f"got y {y.dtype} {y.shape}{f' (min {y.min()})' if y.size and y.ndim == 1 else ''} "
                            f"for x {x.shape}")
        out.append(Split(_from_nhwc(x), torch.from_numpy(y.astype(np.int64))))
    if out[0].x.shape[1:] != out[1].x.shape[1:]:
        raise DataError(f"data.root={root!r}: train.npz holds images of shape (C, H, W) {tuple(out[0].x.shape[1:])} "
                        f"but test.npz {tuple(out[1].x.shape[1:])}")
    num_classes = int(max(out[0].y.max(), out[1].y.max())) + 1
    return out[0], out[1], num_classes


def _cifar(name: str, root: Optional[str], download: bool) -> tuple[Split, Split, int]:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root_dir = Path(root or "~/.cache/dpwa/data").expanduser()
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root_dir), train=train, download=download)
        except Exception as e:  # no network, or no files and download=False
            raise DataError(
                f"Cannot load {name} from data.root={str(root_dir)!r} ({type(e).__name__}: {e}). Put the "
                f"torchvision {name} files there, allow a download with data.download=true on a machine with "
                "a network, or use data.name=npz with a folder of train.npz/test.npz") from None
        splits.append(Split(_from_nhwc(np.asarray(ds.data)), torch.tensor(ds.targets, dtype=torch.int64)))
    return splits[0], splits[1], 10 if name == "cifar10" else 100


class ImageFiles:
    """The images of an ImageFolder split, decoded when indexed: files at full size stay on disk
    (ImageNet at 320 px would be ~390 GB as uint8 in memory). Indexing with a slice, an index
    tensor or a boolean mask returns a uint8 batch (n, 3, size, size), each image's shorter side
    resized to `size` and centre-cropped; `take` returns a lazy subset (class subsets, the
    validation split)."""

    dtype = torch.uint8

    def __init__(self, files: list[str], size: int, root: str = "") -> None:
        self.files, self.size, self.root = files, size, root.rstrip("/")  # root: the split's folder

    def names(self) -> list[str]:
        """Each file's path below `root` (class folder and file name in the ImageNet layout; the
        last two parts without a root): the same wherever the folder is copied."""
        cut = len(self.root) + 1
        return [f[cut:] if self.root and f.startswith(self.root + "/") else "/".join(f.rsplit("/", 2)[-2:])
                for f in self.files]

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), 3, self.size, self.size)

    def _indices(self, key) -> list[int]:
        if isinstance(key, slice):
            return list(range(len(self.files)))[key]
        key = torch.as_tensor(key)
        if key.dtype == torch.bool:
            key = key.nonzero().flatten()
        return key.flatten().tolist()

    def take(self, key) -> "ImageFiles":
        return ImageFiles([self.files[i] for i in self._indices(key)], self.size, self.root)

    def __getitem__(self, key) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        out = torch.empty((0, 3, self.size, self.size), dtype=torch.uint8)
        images = []
        with _quiet_decoding():
            for i in self._indices(key):
                try:
                    x = _decode(self.files[i])
                except Exception as e:  # neither the file nor e's text (PIL's names the file): both tell the batch
                    raise DataError(f"cannot decode an image of this split ({type(e).__name__}). Which file is "
                                    "not said: in a private Poisson batch it would tell which examples the step "
                                    "drew. `ImageFiles.unreadable()` lists the files no image can be decoded "
                                    "from") from None
                images.append(TF.center_crop(TF.resize(x, [self.size], antialias=True), [self.size, self.size]))
        return torch.stack(images) if images else out

    def unreadable(self) -> list[str]:
        """The files that cannot be decoded, from one pass over all of them in order: what a
        decoding error withholds, found without any secret batch (e.g. before training)."""
        return [f for f, problem in self.problems() if problem.startswith("error")]

    def problems(self) -> list[tuple[str, str]]:
        """(file, what PIL said) for every file whose decoding fails ("error: ...") or warns
        ("warning: ...", e.g. a palette image with transparency, or one past
        `PIL.Image.MAX_IMAGE_PIXELS`), from one pass over all files in order. Decoding a batch
        says none of this (see `_quiet_decoding`); this pass depends on no secret batch."""
        found = []
        for f in self.files:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    _decode(f)
                except Exception as e:  # noqa: BLE001 - any failure to decode is what is listed
                    found.append((f, f"error: {type(e).__name__}: {e}"))
            found += [(f, f"warning: {w.category.__name__}: {w.message}") for w in caught]
        return found


def _decode(file: str) -> torch.Tensor:
    """One image file as a uint8 (3, H, W) tensor at its full size."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    with Image.open(file) as img:
        if img.mode.startswith("I"):  # 16- or 32-bit integer greyscale: PIL's convert clips it at 255
            wide = np.asarray(img, dtype=np.int64).clip(0, 65535) >> 8  # 16-bit range onto 8 bits
            return torch.from_numpy(wide.astype(np.uint8)).expand(3, *wide.shape).clone()
        return TF.pil_to_tensor(img.convert("RGB"))


@contextlib.contextmanager
def _quiet_decoding():
    """Decoding a secret batch says nothing. PIL warns when it decodes certain images (a palette
    with transparency; a decompression-bomb warning with the image's pixel count) and logs each
    PNG chunk's length at DEBUG: printed or logged as a private batch is decoded, either would
    tell which examples the step drew. So, in this block, warnings are dropped and PIL's loggers
    (all of them, its plugins imported first) are disabled; `ImageFiles.problems()` reports the
    same warnings from a pass over every file, which depends on no batch."""
    from PIL import Image

    Image.init()  # the plugins' loggers exist before they are disabled
    loggers = [logger for name, logger in logging.Logger.manager.loggerDict.items()
               if (name == "PIL" or name.startswith("PIL.")) and isinstance(logger, logging.Logger)]
    was = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, disabled in zip(loggers, was):
            logger.disabled = disabled


def _example_keys(split: Split) -> list[bytes]:
    """What identifies each example, independently of the others: its label and its pixels (its
    path below the split's folder, for image files: no decoding, and the same wherever the
    folder lies)."""
    labels = split.y.tolist()
    if isinstance(split.x, ImageFiles):
        return [f"{y}:{name}".encode() for y, name in zip(labels, split.x.names())]
    pixels = split.x.contiguous().numpy().reshape(len(split.x), -1)
    return [y.to_bytes(8, "little", signed=True) + row.tobytes() for y, row in zip(labels, pixels)]


def lowest_scores(split: Split, size: int, seed: int) -> torch.Tensor:
    """A boolean mask of the `size` examples of `split` with the lowest scores, each example's
    score a keyed BLAKE2b hash (Aumasson et al. 2013) of its own label and content, keyed by
    `seed` (64 bits, signed). Adding or removing one example changes no other score, so the
    chosen set changes by at most one example in and one out: the rule by which dpwa picks any
    subset of private data (the validation carve, a landscape's examples)."""

    salt = seed.to_bytes(8, "little", signed=True)
    scores = [hashlib.blake2b(key, digest_size=8, key=salt).digest() for key in _example_keys(split)]
    ranked = sorted(range(len(scores)), key=scores.__getitem__)  # a stable sort: ties (identical examples) by position
    chosen = torch.zeros(len(scores), dtype=torch.bool)
    chosen[ranked[:size]] = True
    return chosen


def carve(split: Split, size: int, seed: int, how: str = "stable") -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the validation and training examples of `split`, each in their original order.

    `stable`: each example gets a score from its own label and content and `seed`
    (BLAKE2b, Aumasson et al. 2013), and the `size` lowest scores are the validation split.
    Adding or removing one example changes no other score, so the validation split changes by
    at most one swap and the training split by one example added or removed. The DP-SGD steps
    then see neighbouring training sets, the charged validation counts a neighbouring
    validation set (a swap moves a count by at most 1), and the ledger's composition covers
    both. `permutation` (dpwa before 2026-12-07): a seeded shuffle of all N examples. One example
    more reshuffles every position, so neighbouring data can give splits that differ in
    thousands of examples; that is DP only if the split is taken as fixed and public.

    >>> s = Split(torch.arange(6, dtype=torch.uint8).reshape(6, 1, 1, 1), torch.zeros(6, dtype=torch.long))
    >>> [t.tolist() for t in carve(s, 2, seed=0)]
    [[0, 3], [1, 2, 4, 5]]
    """
    if how == "permutation":
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
        return order[:size], order[size:]
    chosen = lowest_scores(split, size, seed)
    return chosen.nonzero().flatten(), (~chosen).nonzero().flatten()


def _take(x, key):
    """Rows of an in-memory tensor, or a lazy subset of `ImageFiles`."""
    return x.take(key) if isinstance(x, ImageFiles) else x[key]


def _imagefolder(root: str, size: int) -> tuple[Split, Split, int]:
    """train/<class>/* and val/<class>/* (torchvision ImageFolder, the ImageNet layout): files
    are listed now and decoded when a batch needs them (`ImageFiles`)."""
    from torchvision.datasets import ImageFolder

    folder = Path(root).expanduser()
    splits, classes = [], None
    for part in ("train", "val"):
        path = folder / part
        if not path.is_dir():
            raise DataError(f"data.root={root!r}: {path} does not exist (expected the ImageNet layout: "
                            "train/<class>/*.JPEG and val/<class>/*.JPEG)")
        try:
            ds = ImageFolder(str(path))
        except (FileNotFoundError, OSError) as e:  # no class folders, or class folders without images
            raise DataError(f"data.root={root!r}: {path}: {e}") from None
        if classes is None:
            classes = ds.classes
        elif ds.classes != classes:
            raise DataError(f"data.root={root!r}: val/ has classes {ds.classes[:5]}..., train/ has {classes[:5]}...")
        splits.append(Split(ImageFiles([f for f, _ in ds.samples], size, str(path)),  # type: ignore[arg-type]
                            torch.tensor(ds.targets, dtype=torch.int64)))
    return splits[0], splits[1], len(classes or ())


def _resize(split: Split, size: int) -> Split:
    """Shorter side to `size`, centre crop (upsampling CIFAR for models pretrained at larger sizes)."""
    if split.x.shape[-2:] == (size, size):
        return split
    from torchvision.transforms.v2 import functional as TF

    x = torch.cat([TF.center_crop(TF.resize(part, [size], antialias=True), [size, size])
                   for part in split.x.split(2048)])
    return Split(x, split.y)


def _keep_classes(split: Split, classes: list[int], where: str) -> Split:
    table = torch.full((int(max(classes + [int(split.y.max())])) + 1,), -1, dtype=torch.int64)
    table[torch.tensor(classes)] = torch.arange(len(classes))
    y = table[split.y]
    keep = y >= 0
    if not keep.any():
        raise DataError(f"data.classes={classes}: no example of these labels in the {where} split")
    return Split(_take(split.x, keep), y[keep])


_PUBLIC_STATS = {  # published per-channel statistics (public knowledge)
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
}


SOURCES: dict[str, Callable[[DataConfig], tuple[Split, Split, int]]] = {
    "digits": lambda cfg: _digits(),
    "npz": lambda cfg: _npz(cfg.root),  # type: ignore[arg-type]
    "imagefolder": lambda cfg: _imagefolder(cfg.root, cfg.image_size),  # type: ignore[arg-type]
    "cifar10": lambda cfg: _cifar("cifar10", cfg.root, cfg.download),
    "cifar100": lambda cfg: _cifar("cifar100", cfg.root, cfg.download),
}


def register_source(name: str):
    """Decorator: make `data.name: <name>` load your data. The function takes the
    `DataConfig` (its `root` etc.) and returns (train Split, test Split, number of classes),
    images as uint8 (N, C, H, W) tensors and labels as int64; the train split is the private
    one (its labels fingerprint the dataset in the ledger), the test split public or held out.

    >>> import torch
    >>> @register_source("doc-example")
    ... def _tiny(cfg):
    ...     x = torch.zeros(20, 1, 8, 8, dtype=torch.uint8)
    ...     y = torch.arange(20) % 2
    ...     return Split(x, y), Split(x[:4], y[:4]), 2
    >>> load_data(DataConfig(name="doc-example")).num_classes
    2
    >>> del SOURCES["doc-example"]
    """
    def wrap(fn: Callable[[DataConfig], tuple[Split, Split, int]]):
        if name in SOURCES:
            raise ValueError(f"data source {name!r} is registered twice")
        SOURCES[name] = fn
        return fn
    return wrap


def load_data(cfg: DataConfig, *, withhold_train: bool = False, digest: bool = False) -> Data:
    """Load, carve the validation split (a fixed function of `cfg.val_seed`), and set the
    normalisation constants (public ones: see `DataConfig.mean`). With `withhold_train`
    the training split is replaced by a `Withheld` stand-in (evaluation after training);
    `digest`: the source's `content_digest` too (a pass over every byte)."""
    from .features import FEATURES

    train, test, num_classes = SOURCES[cfg.name](cfg)
    # The ledger's identity of the dataset: the labels of the whole source, before any class
    # subset or validation carve-out, so that a subset composes with its parent by construction.
    source = Source(fingerprint(train.y.tolist()), len(train), content_digest(train) if digest else None)
    if cfg.classes is not None:
        missing = [c for c in cfg.classes if c >= num_classes]
        if missing:
            raise DataError(f"data.classes={cfg.classes}: labels {missing} do not exist ({num_classes} classes)")
        train, test = _keep_classes(train, cfg.classes, "train"), _keep_classes(test, cfg.classes, "test")
        num_classes = len(cfg.classes)
    if cfg.image_size is not None:
        train, test = _resize(train, cfg.image_size), _resize(test, cfg.image_size)
    val = None
    if cfg.val_size:
        if cfg.val_size >= len(train):
            raise DataError(f"data.val_size={cfg.val_size} must be smaller than the training set ({len(train)})")
        v, t = carve(train, cfg.val_size, cfg.val_seed, cfg.val_carve)
        val, train = Split(_take(train.x, v), train.y[v]), Split(_take(train.x, t), train.y[t])
    channels = train.x.shape[1]
    default_mean, default_std = _PUBLIC_STATS.get(cfg.name, ([0.5] * channels, [0.25] * channels))
    mean = torch.tensor(cfg.mean if cfg.mean is not None else default_mean)
    std = torch.tensor(cfg.std if cfg.std is not None else default_std)
    if mean.numel() != channels or std.numel() != channels:
        raise DataError(f"data.mean / data.std need {channels} values (one per channel), got {mean.tolist()} / "
                        f"{std.tolist()}")
    if withhold_train:
        train = Withheld(len(train))
    data = Data(cfg.name, train, test, val, mean, std, num_classes, source)
    data.test_time_flip = cfg.test_time_flip
    if cfg.features != "none":
        for split in (train, test, val):
            if isinstance(split, Withheld):
                continue
            if split is not None:
                if cfg.test_time_flip and split is not train:
                    split.mirror = FEATURES[cfg.features](data.normalize(torch.flip(split.x, dims=[-1])))
                split.x = FEATURES[cfg.features](data.normalize(split.x))
        data.features = cfg.features
    return data
