import numpy as np
import pytest
import torch

from nodekd_ray.data import Batches, crop_flip, num_views, pad_images
from nodekd_ray.errors import ConfigError
from nodekd_ray.kd import TeacherLogits, compute_logit_table, kd_loss, validate_kd
from nodekd_ray.checkpoints import build_model
from nodekd_ray.train import StudentConfig, train_student

from conftest import TINY_NODE
from test_data import numpy_view


def numpy_kd(s, t, y, T, lam):
    """Independent Algorithm 1: (1-lam) CE + lam T^2 KL(softmax(t/T) || softmax(s/T)), batch means."""
    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))
    ce = -log_softmax(s)[np.arange(len(y)), y].mean()
    lp_t, lp_s = log_softmax(t / T), log_softmax(s / T)
    kl = (np.exp(lp_t) * (lp_t - lp_s)).sum(1).mean()
    return (1 - lam) * ce + lam * T * T * kl


@pytest.mark.parametrize("T,lam", [(3.0, 0.9), (10.0, 0.9), (20.0, 0.5), (1.0, 0.0), (4.0, 1.0)])
def test_kd_loss_matches_independent_computation(T, lam):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(16, 10)) * 3, rng.normal(size=(16, 10)) * 3
    y = rng.integers(0, 10, 16)
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), T=T, lam=lam)
    assert abs(float(got) - numpy_kd(s, t, y, T, lam)) < 1e-9


@pytest.mark.parametrize("T,lam,field", [(0.0, 0.9, "T"), (-1.0, 0.9, "T"), (3.0, 1.5, "lam"), (3.0, -0.1, "lam")])
def test_bad_kd_settings(T, lam, field):
    with pytest.raises(ConfigError) as e:
        validate_kd(T, lam)
    assert e.value.field == field


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_model("resnet20").eval()


def test_paper_table_is_the_teacher_on_clean_images(teacher, synthetic):
    train = synthetic[0].take(40)
    table = compute_logit_table(teacher, train, mode="paper", batch_size=16)
    assert table.shape == (40, 10) and table.dtype == np.float32
    with torch.no_grad():
        expect = teacher(train.images.float() / 255).numpy()
    np.testing.assert_allclose(table, expect, rtol=1e-4, atol=1e-4)


def test_views_table_matches_the_view_each_image_draws(teacher, synthetic):
    train = synthetic[0].take(6)
    table = compute_logit_table(teacher, train, mode="views", crop_padding=2)
    assert table.shape == (6, num_views(2), 10) and table.dtype == np.float16
    for i, v in [(0, 0), (3, 17), (5, num_views(2) - 1)]:
        img = torch.from_numpy(numpy_view(train.images[i].numpy(), v, 2).copy())[None].float() / 255
        with torch.no_grad():
            expect = teacher(img)[0].numpy()
        np.testing.assert_allclose(table[i, v].astype(np.float32), expect, rtol=2e-3, atol=2e-3)
    # Looked up for an augmented batch, the soft targets are the teacher on exactly that batch.
    soft = TeacherLogits("views", table=table)
    b = next(iter(Batches(train, batch_size=6, crop_padding=2, flip=True, seed=1)))
    with torch.no_grad():
        np.testing.assert_allclose(soft(b.x, b.index, b.view).numpy(), teacher(b.x).numpy(), rtol=2e-3, atol=2e-3)
    assert soft.teacher_forwards == 0


def test_table_modes_never_run_the_teacher(synthetic):
    """With a precomputed table the student run gets no teacher at all; online counts forwards."""
    data = (synthetic[0].take(64), synthetic[1].take(32))
    table = np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32)
    cfg = StudentConfig(dataset="synthetic", epochs=1, batch_size=32, node=__import__("nodekd_ray").NODEConfig(**TINY_NODE))
    _, _, ck = train_student(cfg, table=table, data=data, progress=False, log=lambda m: None)
    assert ck["meta"]["teacher_forwards"] == 0
    torch.manual_seed(0)
    teacher = build_model("resnet20")
    cfg.logits_mode = "online"
    _, _, ck = train_student(cfg, teacher=teacher, data=data, progress=False, log=lambda m: None)
    assert ck["meta"]["teacher_forwards"] == 2  # 64 images / batch 32


def test_views_table_must_fit_the_padding(synthetic):
    data = (synthetic[0].take(8), synthetic[1].take(8))
    table = np.zeros((8, num_views(1), 10), dtype=np.float16)
    cfg = StudentConfig(dataset="synthetic", epochs=1, logits_mode="views", crop_padding=4,
                        node=__import__("nodekd_ray").NODEConfig(**TINY_NODE))
    with pytest.raises(ConfigError, match="crop_padding"):
        train_student(cfg, table=table, data=data, progress=False)


def test_crop_flip_identity(synthetic):
    imgs = synthetic[0].images[:4]
    idx = torch.arange(4)
    from nodekd_ray.data import identity_view
    out = crop_flip(pad_images(imgs, 4), idx, torch.full((4,), identity_view(4)), 4)
    assert torch.equal(out, imgs)
