import copy
import glob

import pytest
import torch

from nodekd_ray.models import NODEConfig
from nodekd_ray.train import (StudentConfig, TeacherConfig, fit, lr_factor, train_student, train_teacher)
from nodekd_ray.errors import ConfigError
from nodekd_ray.checkpoints import build_model

from conftest import TINY_NODE

quiet = dict(progress=False, log=lambda m: None)


def test_paper_defaults():
    t = TeacherConfig(dataset="cifar10")
    assert (t.batch_size, t.momentum, t.resolved_lr(), t.resolved_optimizer()) == (128, 0.9, 0.1, "sgd")
    assert t.resolved_epochs() == 300 and TeacherConfig(dataset="svhn").resolved_epochs() == 40
    assert TeacherConfig(model="resnet110").resolved_lr() == 0.01
    s = StudentConfig(dataset="cifar10")
    assert (s.lam, s.resolved_lr(), s.resolved_epochs(), s.node.width, s.node.solver) == (0.9, 0.001, 200, 512, "dopri5")
    assert StudentConfig(dataset="svhn").resolved_epochs() == 40


def test_optimizer_rule():
    assert StudentConfig(node=NODEConfig(t1=1)).resolved_optimizer() == "sgd"
    assert StudentConfig(node=NODEConfig(t1=100)).resolved_optimizer() == "adam"
    assert StudentConfig(kd=False, node=NODEConfig(t1=1)).resolved_optimizer() == "adam"
    assert StudentConfig(optimizer="sgd", kd=False).resolved_optimizer() == "sgd"


def test_lr_schedule_drops_at_half_and_three_quarters():
    assert [lr_factor(e, 300) for e in (0, 149, 150, 224, 225, 299)] == [1, 1, 0.1, 0.1, 0.01, 0.01]
    assert lr_factor(0, 1) == 1.0


@pytest.mark.parametrize("kw,field", [(dict(dataset="mnist"), "dataset"), (dict(model="resnet18"), "model"),
                                      (dict(epochs=0), "epochs"), (dict(lr=-1.0), "lr"),
                                      (dict(optimizer="rmsprop"), "optimizer")])
def test_bad_teacher_config(kw, field):
    with pytest.raises(ConfigError) as e:
        TeacherConfig(**kw).validate()
    assert e.value.field == field


def test_teacher_learns_and_logs_tensorboard(synthetic, tmp_path):
    cfg = TeacherConfig(dataset="synthetic", epochs=8, batch_size=32, lr=0.05, log_dir=str(tmp_path / "tb"))
    _, history, ckpt = train_teacher(cfg, data=synthetic, **quiet)
    assert [h["epoch"] for h in history] == list(range(1, 9))
    assert history[-1]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert ckpt["meta"]["test_accuracy"] == history[-1]["test_accuracy"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(glob.glob(str(tmp_path / "tb" / "events.*"))[0])
    ev.Reload()
    assert {"resnet20/loss", "resnet20/test_accuracy", "resnet20/lr", "resnet20/nfe_forward"} <= set(ev.Tags()["scalars"])
    assert [s.value for s in ev.Scalars("resnet20/lr")] == pytest.approx([h["lr"] for h in history])


def test_student_reports_nfe_per_epoch(synthetic):
    data = (synthetic[0].take(64), synthetic[1].take(32))
    cfg = StudentConfig(dataset="synthetic", kd=False, epochs=2, batch_size=32, node=NODEConfig(**TINY_NODE))
    _, history, _ = train_student(cfg, data=data, **quiet)
    for h in history:
        assert h["nfe_forward"] >= 8 and 6 <= h["nfe_backward"] <= h["nfe_forward"] and h["nfe_test"] >= 8
    assert [h["lr"] for h in history] == pytest.approx([0.001, 0.0001])  # Adam (no KD), drop at 1/2


def test_resume_continues_exactly(synthetic):
    """Two epochs straight == one epoch, a saved state, and a resumed second epoch."""
    data = (synthetic[0].take(96), synthetic[1].take(32))
    cfg = TeacherConfig(dataset="synthetic", epochs=2, batch_size=32, lr=0.05)
    torch.manual_seed(0)
    straight, h_straight, _ = train_teacher(cfg, data=data, **quiet)
    states = []
    torch.manual_seed(0)
    model, _, _ = train_teacher(cfg, data=data, on_epoch=lambda m, s: states.append(copy.deepcopy(s)), **quiet)
    first = states[0]
    assert first["epoch"] == 1 and len(first["history"]) == 1
    resumed = build_model("resnet20", mean=[0.5] * 3, std=[0.25] * 3)
    h = fit(resumed, cfg, *data, loss_fn=lambda b, lo: torch.nn.functional.cross_entropy(lo, b.y),
            resume=first, **quiet)
    drop = lambda hs: [{k: v for k, v in x.items() if k != "seconds"} for x in hs]  # noqa: E731
    assert drop(h) == drop(h_straight)
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_out_of_memory_is_one_line_naming_the_remedies(synthetic, monkeypatch):
    """A step that does not fit (torch raises OutOfMemoryError) ends training with one line that
    names the batch size and the adjoint method, not a CUDA traceback."""
    from nodekd_ray.models import ODEFunc

    def no_memory(self, t, h):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(ODEFunc, "forward", no_memory)
    cfg = StudentConfig(dataset="synthetic", kd=False, epochs=1, batch_size=32, node=NODEConfig(**TINY_NODE))
    with pytest.raises(ConfigError) as e:
        train_student(cfg, data=synthetic, progress=False, log=lambda m: None)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("batch_size:")
    assert "adjoint" in msg and "smaller batch (now 32)" in msg and "Tried to allocate 20.00 GiB" in msg
    assert "recompute and solver_impl nodekd" in msg


def test_a_students_test_accuracy_is_computed_on_the_reference_computation():
    """A student trained with bf16 convolutions and nodekd's dopri5: its per-epoch test accuracy and NFE are
    those of a reference copy of its weights (fp32, torchdiffeq's dopri5, plain step control) built apart;
    eval_computation "as-trained" gives those of the model as it trains, and the checkpoint says which."""
    from nodekd_ray.data import load_dataset
    from nodekd_ray.models import NeuralODE
    from nodekd_ray.train import evaluate

    data = load_dataset("synthetic", synthetic_sizes=(64, 48))
    tight = dict(width=16, stem_channels=8, rtol=1e-5, atol=1e-5)    # bf16's noise then costs dopri5 steps
    node = NODEConfig(precision="bf16", solver_impl="nodekd", **tight)
    out = {}
    for comp in ("reference", "as-trained"):
        cfg = StudentConfig(dataset="synthetic", kd=False, node=node, epochs=1, batch_size=32, device="cpu",
                            eval_computation=comp)
        model, hist, ckpt = train_student(cfg, data=data, **quiet)
        assert ckpt["meta"]["eval_computation"] == comp
        ref = NeuralODE(NODEConfig(precision="fp32", solver_impl="torchdiffeq", step_control="plain", **tight),
                        10, ckpt["mean"], ckpt["std"])
        ref.load_state_dict(model.state_dict())
        out[comp] = (hist[-1], evaluate(ref, data[1], device="cpu"), evaluate(model, data[1], device="cpu"))
    h, on_ref, as_trained = out["reference"]
    assert (h["test_accuracy"], h["nfe_test"]) == (on_ref["accuracy"], on_ref["nfe_per_image"])
    assert on_ref != as_trained, (on_ref, as_trained)   # the two differ, so the check above can fail
    h, on_ref, as_trained = out["as-trained"]
    assert (h["test_accuracy"], h["nfe_test"]) == (as_trained["accuracy"], as_trained["nfe_per_image"])
    assert "eval_computation" not in StudentConfig().to_dict()          # older records keep matching
    with pytest.raises(ConfigError, match="eval_computation"):
        StudentConfig(eval_computation="fast").validate()
