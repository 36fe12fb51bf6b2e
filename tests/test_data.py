import os
import pickle

import numpy as np
import pytest
import scipy.io as sio
import torch

from nodekd_ray import data as D
from nodekd_ray.errors import ConfigError


def trust(monkeypatch, root, rels):
    """Registers the MD5 of small test files as if torchvision had published them."""
    import hashlib

    for rel in rels:
        with open(os.path.join(root, rel), "rb") as f:
            monkeypatch.setitem(D.KNOWN_MD5, rel, hashlib.md5(f.read()).hexdigest())


def write_cifar(root, n_per_batch=4, n_test=3, seed=0, monkeypatch=None):
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, D.CIFAR_DIR)
    os.makedirs(folder)
    written = {}
    for name, n in [(f, n_per_batch) for f in D.CIFAR_TRAIN] + [("test_batch", n_test)]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        with open(os.path.join(folder, name), "wb") as f:  # the format torchvision downloads
            pickle.dump({"batch_label": name, "labels": y, "data": x, "filenames": [f"{i}.png" for i in range(n)]}, f)
        written[name] = (x, y)
    if monkeypatch is not None:
        trust(monkeypatch, root, [f"{D.CIFAR_DIR}/{f}" for f in D.CIFAR_TRAIN + D.CIFAR_TEST])
    return written


def write_svhn(root, n=5, seed=0, monkeypatch=None, shape=(32, 32, 3)):
    rng = np.random.default_rng(seed)
    out = {}
    for split, fname in D.SVHN_FILES.items():
        x = rng.integers(0, 256, (*shape, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)  # 1..10, where 10 means the digit 0
        sio.savemat(os.path.join(root, fname), {"X": x, "y": y})
        out[split] = (x, y)
    if monkeypatch is not None:
        trust(monkeypatch, root, list(D.SVHN_FILES.values()))
    return out


def test_cifar10_reads_the_real_pickle_format(tmp_path, monkeypatch):
    written = write_cifar(str(tmp_path), monkeypatch=monkeypatch)
    train, test = D.load_dataset("cifar10", root=str(tmp_path))
    assert train.images.dtype == torch.uint8 and train.images.shape == (20, 3, 32, 32)
    assert test.images.shape == (3, 3, 32, 32) and train.labels.dtype == torch.int64
    x, y = written["data_batch_2"]
    np.testing.assert_array_equal(train.images[4:8].numpy(), x.reshape(4, 3, 32, 32))
    assert train.labels[4:8].tolist() == y
    # pixel (c=1, row=2, col=3) of image 0 sits at 1024 + 2*32 + 3 in the flat CIFAR row
    assert int(test.images[0, 1, 2, 3]) == int(written["test_batch"][0][0, 1024 + 2 * 32 + 3])


def test_svhn_reads_the_real_mat_format_and_maps_10_to_0(tmp_path, monkeypatch):
    written = write_svhn(str(tmp_path), monkeypatch=monkeypatch)
    train, test = D.load_dataset("svhn", root=str(tmp_path))
    x, y = written["train"]
    assert train.images.shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(train.images[2].numpy(), x[:, :, :, 2].transpose(2, 0, 1))
    expect = [0 if v == 10 else int(v) for v in y[:, 0]]
    assert train.labels.tolist() == expect and 0 <= int(test.labels.min()) and int(test.labels.max()) <= 9


def test_missing_files_without_download_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        D.load_dataset("cifar10", root=str(tmp_path))
    assert e.value.field == "data" and "--download" in str(e.value)


def test_corrupt_file_is_a_config_error(tmp_path, monkeypatch):
    write_svhn(str(tmp_path))
    with open(tmp_path / "train_32x32.mat", "wb") as f:
        f.write(b"not a mat file")
    with pytest.raises(ConfigError, match="MD5"):   # not the published file: refused before it is read
        D.load_dataset("svhn", root=str(tmp_path))
    trust(monkeypatch, str(tmp_path), list(D.SVHN_FILES.values()))
    with pytest.raises(ConfigError, match="cannot read SVHN"):   # trusted but unreadable: still one line
        D.load_dataset("svhn", root=str(tmp_path))


def test_the_md5_sums_are_torchvisions():
    import torchvision.datasets as tvd

    published = {f"{D.CIFAR_DIR}/{n}": m for n, m in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list}
    published.update({tvd.SVHN.split_list[s][1]: tvd.SVHN.split_list[s][2] for s in ("train", "test")})
    assert D.KNOWN_MD5 == published


class _RunsCode:
    """A crafted pickle: unpickling it calls os.system, which creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("trusted", [False, True])
def test_a_malicious_cifar_batch_never_runs_code(tmp_path, monkeypatch, trusted):
    """trusted=False: the file fails the MD5 check and is not opened. trusted=True (its MD5
    registered as if published): the arrays-only unpickler still refuses to call anything."""
    root = str(tmp_path / "data")
    write_cifar(root, monkeypatch=monkeypatch)
    marker = tmp_path / "pwned"
    path = os.path.join(root, D.CIFAR_DIR, "data_batch_1")
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": _RunsCode(marker)}, f)
    if trusted:
        trust(monkeypatch, root, [f"{D.CIFAR_DIR}/data_batch_1"])
    with pytest.raises(ConfigError) as e:
        D.load_dataset("cifar10", root=root)
    assert not marker.exists()
    assert ("refused global posix.system" in str(e.value)) if trusted else ("MD5" in str(e.value))
    assert e.value.field == "data" and len(str(e.value).splitlines()) == 1
    pickle.loads(pickle.dumps(_RunsCode(marker)))  # the same object through plain pickle does run code
    assert marker.exists()


def test_bad_labels_and_shapes_are_one_line_errors(tmp_path, monkeypatch):
    root = str(tmp_path / "c")
    write_cifar(root)
    path = os.path.join(root, D.CIFAR_DIR, "test_batch")
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((2, 3072), np.uint8), "labels": [3, 10]}, f)
    write_cifar_md5 = [f"{D.CIFAR_DIR}/{f}" for f in D.CIFAR_TRAIN + D.CIFAR_TEST]
    trust(monkeypatch, root, write_cifar_md5)
    with pytest.raises(ConfigError, match=r"labels must be 0\.\.9, found 3\.\.10"):
        D.load_dataset("cifar10", root=root)
    for shape, what in [((32, 32, 1), r"\(32, 32, 1, 5\)"), ((28, 28, 3), r"\(28, 28, 3, 5\)")]:
        root = str(tmp_path / f"s{shape[0]}{shape[2]}")
        os.makedirs(root)
        write_svhn(root, monkeypatch=monkeypatch, shape=shape)
        with pytest.raises(ConfigError, match=f"corrupt SVHN file .*X has shape {what}"):
            D.load_dataset("svhn", root=root)


def test_download_goes_through_torchvision_once(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    def fake_cifar(root, train=True, download=False):  # stands in for the network fetch
        calls.append((root, train, download))
        write_cifar(root, monkeypatch=monkeypatch)

    monkeypatch.setattr(tvd, "CIFAR10", fake_cifar)
    train, _ = D.load_dataset("cifar10", root=str(tmp_path), download=True)
    assert len(train) == 20 and calls == [(str(tmp_path), True, True)]
    D.load_dataset("cifar10", root=str(tmp_path), download=True)  # files there now: no second fetch
    assert len(calls) == 1


def test_digits_is_fixed_and_upsampled():
    a_train, a_test = D.load_dataset("digits")
    b_train, _ = D.load_dataset("digits", seed=5)
    assert a_train.images.shape == (1438, 3, 32, 32) and len(a_test) == 359
    assert torch.equal(a_train.labels, b_train.labels)
    assert set(a_train.labels.tolist()) == set(range(10))
    assert a_train.images.dtype == torch.uint8 and int(a_train.images.max()) > 200


def numpy_view(img, view, p):
    """Independent crop/flip of one (C, H, W) uint8 image from its view id."""
    side = 2 * p + 1
    flip, off = view % 2, view // 2
    dy, dx = off // side, off % side
    padded = np.pad(img, ((0, 0), (p, p), (p, p)))
    out = padded[:, dy:dy + img.shape[1], dx:dx + img.shape[2]]
    return out[:, :, ::-1] if flip else out


def test_batches_match_an_independent_crop_and_flip(synthetic):
    train, _ = synthetic
    it = D.Batches(train, batch_size=50, crop_padding=4, flip=True, seed=3)
    seen, views = [], []
    for b in it:
        assert b.x.dtype == torch.float32 and 0 <= float(b.x.min()) and float(b.x.max()) <= 1
        for j in range(0, len(b.y), 7):
            i, v = int(b.index[j]), int(b.view[j])
            expect = numpy_view(train.images[i].numpy(), v, 4)
            np.testing.assert_array_equal((b.x[j] * 255).round().to(torch.uint8).numpy(), expect)
            assert int(b.y[j]) == int(train.labels[i])
        seen += b.index.tolist()
        views += b.view.tolist()
    assert sorted(seen) == list(range(len(train)))  # each image once per epoch
    assert any(v % 2 for v in views) and len(set(views)) > 50


def test_batches_reproducible_per_seed_and_epoch(synthetic):
    train, _ = synthetic
    def epoch(seed, e):
        it = D.Batches(train, batch_size=64, crop_padding=4, flip=True, seed=seed)
        it.set_epoch(e)
        return [(b.index, b.view, b.x) for b in it]
    a, b, c, d = epoch(1, 0), epoch(1, 0), epoch(1, 1), epoch(2, 0)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[2], y[2]) for x, y in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0]) and not torch.equal(a[0][0], d[0][0])


def test_no_augmentation_gives_identity_views(synthetic):
    train, _ = synthetic
    b = next(iter(D.Batches(train, batch_size=32, shuffle=False)))
    assert torch.equal(b.x, train.images[:32].float() / 255)
    assert set(b.view.tolist()) == {D.identity_view(0)}
    b = next(iter(D.Batches(train, batch_size=32, crop_padding=4, flip=False, seed=0)))
    assert all(int(v) % 2 == 0 for v in b.view) and D.num_views(4) == 162


@pytest.mark.parametrize("flip", [True, False])
def test_view_bank_matches_the_reference_gather_for_every_view(synthetic, flip):
    imgs = synthetic[0].images[:6]
    p = 2
    bank = D.ViewBank(imgs, p, flip)
    views = torch.arange(D.num_views(p)) if flip else torch.arange(0, D.num_views(p), 2)
    idx = torch.arange(len(views)) % len(imgs)
    got = bank.gather(idx, views)
    assert torch.equal(got, D.crop_flip(D.pad_images(imgs, p), idx, views, p))
    for j in (0, 7, len(views) - 1):
        np.testing.assert_array_equal(got[j].numpy(), numpy_view(imgs[int(idx[j])].numpy(), int(views[j]), p))
    if not flip:
        with pytest.raises(ValueError, match="flip"):
            bank.gather(idx[:1], torch.tensor([1]))
