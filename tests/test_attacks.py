import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchattacks

from nodekd_ray.attacks import attack_sweep, fgsm, mifgsm, parse_eps, pgd, steps_for_eps, sweep_table
from nodekd_ray.errors import ConfigError
from nodekd_ray.checkpoints import build_model
from nodekd_ray.results import atomic_write_table

from conftest import TINY_NODE


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"resnet20": build_model("resnet20").eval(), "node": build_model("node", node=TINY_NODE).eval()}


@pytest.fixture(scope="module")
def batch(synthetic):
    test = synthetic[1]
    return test.images[:16].float() / 255, test.labels[:16]


def test_steps_formula():
    # s = floor(min(255 eps + 4, 1.25 * 255 eps)), checked by hand
    assert [steps_for_eps(k / 255) for k in (0, 1, 2, 3, 4, 8, 12, 16, 20)] == [0, 1, 2, 3, 5, 10, 15, 20, 24]


@pytest.mark.parametrize("arch", ["resnet20", "node"])
@pytest.mark.parametrize("eps_255", [4, 8])
def test_mifgsm_matches_torchattacks(models, batch, arch, eps_255):
    model, (x, y) = models[arch], batch
    eps = eps_255 / 255
    ours = mifgsm(model, x, y, eps=eps)
    ref = torchattacks.MIFGSM(model, eps=eps, alpha=1 / 255, steps=steps_for_eps(eps), decay=1.0)(x, y)
    assert (ours - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["resnet20", "node"])
def test_pgd_without_random_start_matches_torchattacks(models, batch, arch):
    model, (x, y) = models[arch], batch
    eps = 8 / 255
    ours = pgd(model, x, y, eps=eps, random_start=False)
    ref = torchattacks.PGD(model, eps=eps, alpha=1 / 255, steps=steps_for_eps(eps), random_start=False)(x, y)
    assert (ours - ref).abs().max().item() <= 1e-5


def test_adversarial_images_stay_in_the_ball_and_pixel_range(models, batch):
    model, (x, y) = models["resnet20"], batch
    for eps in (2 / 255, 8 / 255):
        for adv in (pgd(model, x, y, eps=eps, generator=torch.Generator().manual_seed(0)),
                    mifgsm(model, x, y, eps=eps), fgsm(model, x, y, eps=eps)):
            assert (adv - x).abs().max().item() <= eps + 1e-6
            assert adv.min().item() >= 0 and adv.max().item() <= 1
            assert not torch.equal(adv, x)


def test_pgd_random_start_is_seeded(models, batch):
    model, (x, y) = models["resnet20"], batch
    a = pgd(model, x, y, eps=4 / 255, generator=torch.Generator().manual_seed(1))
    b = pgd(model, x, y, eps=4 / 255, generator=torch.Generator().manual_seed(1))
    c = pgd(model, x, y, eps=4 / 255, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sweep_rows_nfe_and_parquet_round_trip(models, synthetic, tmp_path):
    test = synthetic[1].take(24)
    eps_list = [0.0, 2 / 255, 8 / 255]
    res = attack_sweep(models["node"], test.images, test.labels, attack="pgd", eps_list=eps_list, batch_size=10)
    assert len(res.eps) == 3 * 24
    clean = res.clean_correct[res.eps == 0]
    assert np.array_equal(res.adv_correct[res.eps == 0], clean)  # eps = 0 is the clean accuracy
    assert not np.any(res.adv_correct & ~res.clean_correct)    # misclassified images count as not robust
    acc = res.robust_accuracy()
    assert acc[8 / 255] <= acc[0.0]
    attacked = (res.eps == 8 / 255) & res.clean_correct
    assert np.all(res.nfe[attacked] > res.nfe[res.eps == 0][res.clean_correct[res.eps == 0]].max())
    assert set(res.steps[res.eps == 8 / 255]) == {10}
    path = str(tmp_path / "a.parquet")
    atomic_write_table(sweep_table(res, seed=0), path)
    back = pq.read_table(path).to_pandas()
    assert set(back.computation) == {"reference"} and set(back.precision) == {"fp32"} and set(back.solver) == {"dopri5"}
    assert len(back) == 72 and back.groupby("eps_255").adv_correct.mean().to_dict() == pytest.approx(
        {e * 255: a for e, a in acc.items()})


def test_sweep_resnet_against_torchattacks_loop(models, synthetic):
    """Robust accuracy equals torchattacks looped over eps (PGD without random start, every image attacked)."""
    model = models["resnet20"]
    test = synthetic[1].take(32)
    eps_list = [2 / 255, 6 / 255]
    res = attack_sweep(model, test.images, test.labels, attack="pgd", eps_list=eps_list, batch_size=32,
                       attack_misclassified=True)
    x, y = test.images.float() / 255, test.labels
    for e in eps_list:
        adv = torchattacks.PGD(model, eps=e, alpha=1 / 255, steps=steps_for_eps(e), random_start=False)(x, y)
        with torch.no_grad():
            ref = (model(adv).argmax(1) == y).float().mean().item()
        # random start differs, so allow a couple of images either way
        assert abs(res.robust_accuracy()[e] - ref) <= 3 / 32


@pytest.mark.parametrize("text", ["2", "-0.1", "abc", "1/0", ""])
def test_bad_eps(text):
    with pytest.raises(ConfigError) as e:
        parse_eps(text)
    assert e.value.field == "eps"


def test_parse_eps_fractions():
    assert parse_eps("0, 8/255,0.5") == [0.0, 8 / 255, 0.5]


def test_attacks_run_on_the_reference_computation_unless_asked_to_run_as_trained():
    """A student trained with speed settings (bf16 convolutions, nodekd's dopri5) is attacked on the
    reference computation by default: NFE and results equal to those of a reference copy of its weights,
    built apart. --eval-as-trained attacks it as it is, and its rows say so."""
    from nodekd_ray.attacks import attack_sweep
    from nodekd_ray.computation import as_reference
    from nodekd_ray.models import NeuralODE, NODEConfig

    torch.manual_seed(0)
    fast = NeuralODE(NODEConfig(width=8, stem_channels=8, precision="bf16", solver_impl="nodekd"))
    ref = NeuralODE(NODEConfig(width=8, stem_channels=8, precision="fp32", solver_impl="torchdiffeq",
                               step_control="plain"))
    ref.load_state_dict(fast.state_dict())
    x = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        logits = {"fast": fast(x.float() / 255), "ref": ref(x.float() / 255), "as_ref": as_reference(fast)(x.float() / 255)}
    assert torch.equal(logits["as_ref"], logits["ref"]) and not torch.equal(logits["fast"], logits["ref"])
    y = logits["ref"].argmax(1)       # every image starts correct, so every one is attacked
    kw = dict(attack="pgd", eps_list=[0.0, 8 / 255], steps=3, batch_size=12, seed=0)
    default, on_ref = attack_sweep(fast, x, y, **kw), attack_sweep(ref, x, y, **kw)
    assert np.array_equal(default.nfe, on_ref.nfe) and np.array_equal(default.adv_correct, on_ref.adv_correct)
    assert default.computation == {"computation": "reference", "precision": "fp32", "step_control": "plain",
                                   "solver_impl": "torchdiffeq", "norm_impl": "torch", "cuda_graphs": False,
                                   "torch_version": torch.__version__}
    trained = attack_sweep(fast, x, y, computation="as-trained", **kw)
    assert trained.computation["computation"] == "as-trained"
    assert trained.computation["precision"] == "bf16" and trained.computation["solver_impl"] == "nodekd"
    assert fast.cfg.precision == "bf16" and fast.func.precision == "bf16"    # the model itself is left as it was
    with pytest.raises(ConfigError, match="computation"):
        attack_sweep(fast, x, y, computation="fast", **kw)
