"""Data sets as device-resident uint8 tensors, and a batched crop/flip batch iterator.

Every data set becomes ``ImageSet(images uint8 (N, C, H, W), labels int64 (N,))``.
``cifar10`` and ``svhn`` read the files torchvision downloads (python pickle batches,
``*_32x32.mat``); a missing file is downloaded through ``torchvision.datasets`` under a
file lock, so several processes on one node download once. ``digits`` is scikit-learn's
bundled 8x8 digits upsampled to 3x32x32 (works offline), ``synthetic`` is for tests.

Augmentation (random crop with zero padding + horizontal flip) runs on whole batches as
tensor indexing: no PIL, no per-sample Python. Each image's draw is a *view id*
``(dy * (2p+1) + dx) * 2 + flip``, so teacher logits can be looked up per view (see kd.py).
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .errors import ConfigError, check_choice

DATASETS = ("digits", "cifar10", "svhn", "synthetic")

# Per-data-set augmentation defaults (the paper: "randomized horizontal crop"; we read it as
# random crop with 4-pixel padding plus horizontal flip). Flipping house numbers (SVHN) or
# handwritten digits changes what they are, so those default to crop only.
AUGMENT_DEFAULTS = {
    "cifar10": dict(crop_padding=4, flip=True),
    "svhn": dict(crop_padding=4, flip=False),
    "digits": dict(crop_padding=4, flip=False),
    "synthetic": dict(crop_padding=4, flip=True),
}

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}

# torchvision's published MD5 sums (torchvision.datasets.CIFAR10.train_list / test_list and
# SVHN.split_list; a test keeps them equal). Every file is checked before it is read: a data root
# is often a shared folder (the cluster's EFS), and a CIFAR-10 batch is a Python pickle, which
# runs code when unpickled. A file that fails is refused in one line. On top of that the batches
# are read by an unpickler that only builds dicts, lists, strings and numpy arrays.
KNOWN_MD5 = {
    f"{CIFAR_DIR}/data_batch_1": "c99cafc152244af753f735de768cd75f",
    f"{CIFAR_DIR}/data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    f"{CIFAR_DIR}/data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    f"{CIFAR_DIR}/data_batch_4": "634d18415352ddfa80567beed471001a",
    f"{CIFAR_DIR}/data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    f"{CIFAR_DIR}/test_batch": "40351d587109b95175f43aff81a1287e",
    "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
    "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
}


def check_md5(root: str, rel: str) -> str:
    """The file's path once its MD5 is torchvision's published one; a one-line ConfigError otherwise."""
    import hashlib

    path = os.path.join(root, rel)
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    got, want = h.hexdigest(), KNOWN_MD5[rel]
    if got != want:
        raise ConfigError("data", f"{path} fails torchvision's MD5 check (md5 {got}, published {want}): it is not "
                                  "the published file and is not read; delete it and pass --download")
    return path


class _ArraysOnly(pickle.Unpickler):
    """Unpickles the CIFAR-10 batch format (dicts, lists, strings, bytes, numpy arrays) and nothing
    else: any other global, the way a crafted pickle runs code, is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    num_classes: int
    name: str

    def __len__(self) -> int:
        return self.labels.shape[0]

    def take(self, n: int | None) -> "ImageSet":
        """The first n examples (all when n is None)."""
        if n is None or n >= len(self):
            return self
        return ImageSet(self.images[:n], self.labels[:n], self.num_classes, self.name)

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device), self.num_classes, self.name)


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units (for in-model normalization)."""
    x = images.to(torch.float64).div_(255.0)  # (N, C, H, W)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return mean.tolist(), std.tolist()


# ----------------------------------------------------------------------------- loading

def load_dataset(name: str, *, root: str = "data", download: bool = False,
                 synthetic_sizes: tuple[int, int] = (512, 256), seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Returns (train, test) for one of ``DATASETS``. Raises ConfigError on bad input."""
    check_choice("dataset", name, DATASETS)
    if name == "digits":
        return _digits(seed=0)  # the split is fixed, whatever the training seed
    if name == "synthetic":
        return _synthetic(*synthetic_sizes, seed=seed)
    if name == "cifar10":
        _ensure_files(root, [os.path.join(CIFAR_DIR, f) for f in CIFAR_TRAIN + CIFAR_TEST], download,
                      lambda: _tv_download("CIFAR10", root))
        return (_read_cifar(root, CIFAR_TRAIN, "cifar10"), _read_cifar(root, CIFAR_TEST, "cifar10"))
    _ensure_files(root, list(SVHN_FILES.values()), download, lambda: _tv_download("SVHN", root))
    return _read_svhn(root, "train"), _read_svhn(root, "test")


def _ensure_files(root: str, rel_paths: list[str], download: bool, fetch) -> None:
    missing = [p for p in rel_paths if not os.path.exists(os.path.join(root, p))]
    if not missing:
        return
    if not download:
        raise ConfigError("data", f"missing {os.path.join(root, missing[0])}; pass --download "
                                  f"or put the torchvision files under --data-root")
    from filelock import FileLock

    os.makedirs(root, exist_ok=True)
    with FileLock(os.path.join(root, ".nodekd-download.lock")):
        # Another process may have finished the download while we waited for the lock.
        if any(not os.path.exists(os.path.join(root, p)) for p in rel_paths):
            fetch()


def _tv_download(kind: str, root: str) -> None:
    """The real download path: torchvision fetches, checks the MD5 sums and unpacks."""
    import torchvision.datasets as tvd

    try:
        if kind == "CIFAR10":
            tvd.CIFAR10(root, train=True, download=True)
        else:
            for split in ("train", "test"):
                tvd.SVHN(root, split=split, download=True)
    except Exception as e:  # network errors, checksum failures
        raise ConfigError("data", f"download of {kind} into {root} failed: {e}") from None


def _read_cifar(root: str, files: list[str], name: str) -> ImageSet:
    xs, ys = [], []
    for f in files:
        path = check_md5(root, f"{CIFAR_DIR}/{f}")
        try:
            with open(path, "rb") as fh:
                entry = _ArraysOnly(fh, encoding="latin1").load()
            data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"], dtype=np.int64)
        except Exception as e:
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise ConfigError("data", f"cannot read CIFAR-10 batch {path}: {type(e).__name__}: {why}") from None
        if labels.ndim != 1 or len(labels) != len(data):
            raise ConfigError("data", f"corrupt CIFAR-10 batch {path}: {len(data)} images, {labels.size} labels")
        if len(labels) and not (0 <= labels.min() and labels.max() <= 9):
            raise ConfigError("data", f"corrupt CIFAR-10 batch {path}: labels must be 0..9, found "
                                      f"{int(labels.min())}..{int(labels.max())}")
        xs.append(data)
        ys.append(labels)
    return ImageSet(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), 10, name)


def _read_svhn(root: str, split: str) -> ImageSet:
    import scipy.io as sio

    path = check_md5(root, SVHN_FILES[split])
    try:
        mat = sio.loadmat(path)   # MAT files hold arrays only: nothing in them is executed
        x = np.asarray(mat["X"])
        y = np.asarray(mat["y"]).reshape(-1)
    except Exception as e:
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ConfigError("data", f"cannot read SVHN file {path}: {type(e).__name__}: {why}") from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise ConfigError("data", f"corrupt SVHN file {path}: X has shape {x.shape}, y {y.shape}; expected X "
                                  "(32, 32, 3, N) and N labels")
    if x.dtype != np.uint8:
        raise ConfigError("data", f"corrupt SVHN file {path}: X is {x.dtype}, expected uint8 pixels")
    if len(y) and not (1 <= y.min() and y.max() <= 10):
        raise ConfigError("data", f"corrupt SVHN file {path}: labels must be 1..10, found {int(y.min())}..{int(y.max())}")
    y = np.where(y == 10, 0, y).astype(np.int64)  # the .mat files label the digit 0 as 10
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))  # (N, 3, 32, 32)
    return ImageSet(images, torch.from_numpy(y), 10, "svhn")


def _digits(seed: int) -> tuple[ImageSet, ImageSet]:
    """scikit-learn's 1797 8x8 digits, bilinearly upsampled to 3x32x32; fixed 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(round(0.8 * len(y)))
    tr, te = perm[:n_train], perm[n_train:]
    return ImageSet(x[tr], y[tr], 10, "digits"), ImageSet(x[te], y[te], 10, "digits")


def _synthetic(n_train: int, n_test: int, seed: int, num_classes: int = 10) -> tuple[ImageSet, ImageSet]:
    """Random images around one random template per class: learnable, for tests only."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, 3, 32, 32, generator=g)

    def make(n):
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = 0.6 * templates[y] + 0.4 * torch.rand(n, 3, 32, 32, generator=g)
        return ImageSet((x * 255).round().to(torch.uint8), y, num_classes, "synthetic")

    return make(n_train), make(n_test)


# ----------------------------------------------------------------------------- augmentation

def num_views(crop_padding: int) -> int:
    """Distinct crop x flip views: (2p+1)^2 offsets times 2 flips (162 for p = 4)."""
    return (2 * crop_padding + 1) ** 2 * 2


def identity_view(crop_padding: int) -> int:
    """The view id of the un-augmented image (centre crop, no flip)."""
    return (crop_padding * (2 * crop_padding + 1) + crop_padding) * 2


def decode_views(view: torch.Tensor, crop_padding: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """view ids (B,) -> (dy, dx, flip), the inverse of the encoding in the module docstring."""
    side = 2 * crop_padding + 1
    flip = view % 2
    offset = view // 2
    return offset // side, offset % side, flip.bool()


def pad_images(images: torch.Tensor, crop_padding: int) -> torch.Tensor:
    """(N, C, H, W) uint8 -> (N, C, H+2p, W+2p), zero fill (as torchvision's RandomCrop)."""
    if crop_padding == 0:
        return images
    return torch.nn.functional.pad(images, (crop_padding,) * 4)


def crop_flip(padded: torch.Tensor, index: torch.Tensor, view: torch.Tensor, crop_padding: int) -> torch.Tensor:
    """Gathers view ``view[b]`` of image ``index[b]`` from padded uint8 images, as one tensor op.

    The plain reference implementation; ``ViewBank`` (used by ``Batches``) is the fast one.

    padded: (N, C, H+2p, W+2p) uint8; index, view: (B,) int64 on padded's device.
    Returns (B, C, H, W) uint8.
    """
    h = padded.shape[2] - 2 * crop_padding
    w = padded.shape[3] - 2 * crop_padding
    dy, dx, flip = decode_views(view, crop_padding)
    ar_h = torch.arange(h, device=padded.device)
    ar_w = torch.arange(w, device=padded.device)
    rows = dy[:, None] + ar_h  # (B, H)
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ar_w, ar_w)  # (B, W), reversed when flipped
    out = padded[index[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


class ViewBank:
    """Every crop x flip view of a set of images as a strided view, gathered in one indexing op.

    ``padded.unfold`` turns (N, C, H+2p, W+2p) into (N, C, 2p+1, 2p+1, H, W) without copying,
    so a crop is an index on the two offset dims. Flips are served from a second, mirrored
    copy of the padded images (view (dy, dx, flip) of image i is the un-flipped crop
    (dy, 2p - dx) of mirrored image i), which costs one extra uint8 copy of the padded set
    (480 MB for CIFAR10's 50k training images) and makes the gather 1.8x faster than flipping
    after it. Same output as ``crop_flip``; tested against it.
    """

    def __init__(self, images: torch.Tensor, crop_padding: int, flip: bool):
        p = crop_padding
        h, w = images.shape[2], images.shape[3]
        padded = pad_images(images, p)
        self.n, self.p, self.flip = len(images), p, flip
        bank = torch.cat([padded, padded.flip(-1)]) if flip else padded
        self.windows = bank.unfold(2, h, 1).unfold(3, w, 1)  # (N or 2N, C, 2p+1, 2p+1, H, W)

    def gather(self, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """(B,) image indices and view ids -> (B, C, H, W) uint8."""
        dy, dx, flip = decode_views(view, self.p)
        if self.flip:
            dx = torch.where(flip, 2 * self.p - dx, dx)
            index = index + self.n * flip.long()
        elif bool(flip.any()):
            raise ValueError("view ids with flip=1 need a ViewBank built with flip=True")
        return self.windows[index, :, dy, dx]


@dataclass
class Batch:
    x: torch.Tensor      # (B, C, H, W) float32 in [0, 1]
    y: torch.Tensor      # (B,) int64
    index: torch.Tensor  # (B,) int64, position in the data set
    view: torch.Tensor   # (B,) int64, the crop/flip view each image got


class Batches:
    """Iterates over a device-resident ImageSet in batches, augmenting on the device.

    Epoch e of a ``Batches(seed=s)`` is a pure function of (s, e): the shuffle and the views
    are drawn from a CPU generator seeded with both, so a resumed run sees the same batches.
    """

    def __init__(self, data: ImageSet, *, batch_size: int, device="cpu", shuffle: bool = True,
                 crop_padding: int = 0, flip: bool = False, seed: int = 0, drop_last: bool = False):
        if batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
        self.data = data.to(device)
        self.bank = ViewBank(self.data.images, crop_padding, flip) if (crop_padding > 0 or flip) else None
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.crop_padding, self.flip, self.seed = crop_padding, flip, seed
        self.device = torch.device(device)
        self.epoch = 0

    @property
    def augment(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draw(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The order and the views of one epoch: (perm (N,), view (N,)), on the device."""
        n, p = len(self.data), self.crop_padding
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        side = 2 * p + 1
        dy = torch.randint(0, side, (n,), generator=g)
        dx = torch.randint(0, side, (n,), generator=g)
        fl = torch.randint(0, 2, (n,), generator=g) if self.flip else torch.zeros(n, dtype=torch.int64)
        view = (dy * side + dx) * 2 + fl if self.augment else torch.full((n,), identity_view(p))
        return perm.to(self.device), view.to(self.device)

    def __iter__(self) -> Iterator[Batch]:
        perm, view = self.draw(self.epoch)
        self.epoch += 1
        n, bs = len(self.data), self.batch_size
        stop = n - n % bs if self.drop_last else n
        for start in range(0, stop, bs):
            idx = perm[start:start + bs]
            v = view[start:start + bs]
            if self.augment:
                x = self.bank.gather(idx, v)
            else:
                x = self.data.images[idx]
            yield Batch(x.float().div_(255.0), self.data.labels[idx], idx, v)
