"""Teacher and student recipes (the paper's values as defaults) and one training loop.

Paper, section 3.2. Teachers: SGD momentum 0.9, lr 0.1 (0.01 for ResNet110), batch 128, 300
epochs on CIFAR10 / 40 on SVHN, lr x0.1 at 1/2 and x0.01 at 3/4 of the epochs. Students: lr
0.001, same schedule, 200 epochs CIFAR10 / 40 SVHN, batch 128, He init; SGD momentum 0.9 for
t1 <= 1 with KD, Adam for larger horizons and every student trained without KD. lam = 0.9.

Choices the paper leaves open (each a field below): weight decay (teachers 1e-4 as in He et al.
2016; students 0), epochs on ``digits``/``synthetic`` (not in the paper: 30 / 5), augmentation
(data.AUGMENT_DEFAULTS), the temperature default (10, the best CIFAR10 setting of Table 2).
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from .config_cli import opt
from .data import AUGMENT_DEFAULTS, DATASETS, Batches, ImageSet, channel_stats, load_dataset, num_views
from .errors import ConfigError, check_choice, check_range
from .kd import LOGIT_MODES, TeacherLogits, compute_logit_table, kd_loss, validate_kd
from .checkpoints import build_model, nfe_totals, save_checkpoint
from .computation import as_reference, reference_arithmetic
from .models import RESNET_DEPTHS, NODEConfig, speed_part

TEACHER_EPOCHS = {"cifar10": 300, "svhn": 40, "digits": 30, "synthetic": 5}
STUDENT_EPOCHS = {"cifar10": 200, "svhn": 40, "digits": 30, "synthetic": 5}
OPTIMIZERS = ("auto", "sgd", "adam")


@dataclass
class RecipeConfig:
    # Fields with metadata help become command-line options of nodekd and the sweeps (config_cli.py): the flag,
    # its type, choices, default and help are written here once.
    dataset: str = opt("digits", "data set", choices=DATASETS)
    data_root: str = opt("data", "folder with the torchvision files of cifar10/svhn")
    download: bool = opt(False, "download missing cifar10/svhn files through torchvision")
    epochs: int | None = opt(None, "training epochs; if not given, the paper's for the data set (teachers 300 on cifar10, "
                                   "students 200; 40 on svhn; 30 on digits)")
    batch_size: int = opt(128, "mini-batch size (paper: 128)")
    lr: float | None = opt(None, "initial learning rate; if not given, the paper's (teachers 0.1, ResNet110 0.01; "
                                 "students 0.001)")
    lr_milestones: tuple = (0.5, 0.75)  # fractions of the epochs where lr drops (paper: 1/2, 3/4)
    lr_factors: tuple = (0.1, 0.01)    # lr multipliers from each milestone on (paper: 1/10, 1/100)
    momentum: float = opt(0.9, "SGD momentum (paper: 0.9)")
    weight_decay: float | None = opt(None, "weight decay; if not given, teachers 1e-4 (He et al.), students 0 (paper "
                                           "silent)")
    optimizer: str = opt("auto", "auto (the paper's rule: SGD for teachers and KD students at t1 <= 1, else "
                                 "Adam), sgd or adam", choices=OPTIMIZERS)
    crop_padding: int | None = opt(None, "random-crop padding in pixels; if not given, 4")
    flip: bool | None = opt(None, "random horizontal flip; if not given, on for cifar10, off for svhn and digits")
    seed: int = opt(0, "seed for weights, shuffling, augmentation and attacks")
    device: str = opt("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    eval_batch_size: int = opt(500, "fixed evaluation batch size (dopri5's step is shared by a batch)")
    limit_train: int | None = opt(None, "train on the first N training images only", metavar="N")
    limit_test: int | None = opt(None, "evaluate on the first N test images only", metavar="N")
    log_dir: str | None = opt(None, "write TensorBoard event files here")
    synthetic_sizes: tuple = (512, 256)  # (train, test) sizes of the synthetic data set
    eval_computation: str = "reference"  # what the test accuracy after each epoch is computed on: "reference"
                                       # (computation.as_reference: fp32 IEEE, torchdiffeq's dopri5, plain step
                                       # control, PyTorch's norms, no graphs), whatever the model trains with,
                                       # or "as-trained" (its training settings)

    def resolved_epochs(self) -> int:
        return self.epochs if self.epochs is not None else self.default_epochs()[self.dataset]

    def augment(self) -> tuple[int, bool]:
        d = AUGMENT_DEFAULTS[self.dataset]
        return (d["crop_padding"] if self.crop_padding is None else self.crop_padding,
                d["flip"] if self.flip is None else self.flip)

    def validate(self):
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("eval_computation", self.eval_computation, ("reference", "as-trained"))
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError("epochs", f"must be >= 1, got {self.epochs}")
        for name in ("batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.lr is not None:
            check_range("lr", self.lr, 0, None, lo_open=True)
        check_range("momentum", self.momentum, 0, 1)
        if self.weight_decay is not None:
            check_range("weight_decay", self.weight_decay, 0, None)
        if self.crop_padding is not None and self.crop_padding < 0:
            raise ConfigError("crop_padding", f"must be >= 0, got {self.crop_padding}")
        for name in ("limit_train", "limit_test"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(name, f"must be >= 1, got {v}")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            raise ConfigError("device", f"unknown device {self.device!r}; allowed: auto, cpu, cuda, cuda:N")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("device", "cuda was asked for, but torch sees no GPU here")
        return self

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["eval_computation"] == "reference":   # records made before evaluation had a choice keep matching
            del d["eval_computation"]
        return d


@dataclass
class TeacherConfig(RecipeConfig):
    model: str = opt("resnet20", "the teacher ResNet", choices=tuple(RESNET_DEPTHS))

    @staticmethod
    def default_epochs():
        return TEACHER_EPOCHS

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (0.01 if self.model == "resnet110" else 0.1)

    def resolved_weight_decay(self) -> float:
        return 1e-4 if self.weight_decay is None else self.weight_decay

    def resolved_optimizer(self) -> str:
        return "sgd" if self.optimizer == "auto" else self.optimizer

    def validate(self):
        check_choice("model", self.model, tuple(RESNET_DEPTHS))
        return super().validate()


@dataclass
class StudentConfig(RecipeConfig):
    node: NODEConfig = field(default_factory=NODEConfig)  # the student's architecture and solver
    kd: bool = opt(True, "train without distillation (the NODE baseline)", negate=True)
    T: float = opt(10.0, "KD temperature, > 0 (paper grid: 3, 10, 20)")
    lam: float = opt(0.9, "weight of the KD term, in [0, 1] (paper: 0.9)")
    logits_mode: str = opt("paper", "teacher logits: paper (once, on clean images), views (once per crop and flip "
                                    "view) or online (a teacher forward per batch); see nodekd_ray/kd.py",
                           choices=LOGIT_MODES)

    @staticmethod
    def default_epochs():
        return STUDENT_EPOCHS

    def resolved_lr(self) -> float:
        return 0.001 if self.lr is None else self.lr

    def resolved_weight_decay(self) -> float:
        return 0.0 if self.weight_decay is None else self.weight_decay

    def resolved_optimizer(self) -> str:
        if self.optimizer != "auto":
            return self.optimizer
        return "sgd" if (self.kd and self.node.t1 <= 1) else "adam"

    def validate(self):
        self.node.validate()
        validate_kd(self.T, self.lam)
        check_choice("logits_mode", self.logits_mode, LOGIT_MODES)
        return super().validate()


def lr_factor(epoch: int, epochs: int, milestones=(0.5, 0.75), factors=(0.1, 0.01)) -> float:
    """The paper's step schedule: 1, then factors[i] from epoch round(milestones[i] * epochs).

    A milestone never falls on epoch 0, so a 1-epoch smoke run trains at the initial lr.
    """
    f = 1.0
    for m, k in zip(milestones, factors):
        if epoch >= max(1, int(round(m * epochs))):
            f = k
    return f


def make_optimizer(cfg: RecipeConfig, params):
    name, lr, wd = cfg.resolved_optimizer(), cfg.resolved_lr(), cfg.resolved_weight_decay()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, weight_decay=wd)


# ----------------------------------------------------------------------------- loop


@torch.no_grad()
def evaluate(model, data: ImageSet, *, batch_size: int = 500, device="cpu", computation: str = "as-trained") -> dict:
    """Clean accuracy over fixed, in-order batches, and forward NFE per image. computation "reference" evaluates
    a copy of ``model`` on the reference computation (computation.as_reference, IEEE fp32 arithmetic)."""
    if computation == "reference":
        with reference_arithmetic():
            return evaluate(as_reference(model), data, batch_size=batch_size, device=device)
    model.eval()
    correct, nfe_img = 0, 0
    for s in range(0, len(data), batch_size):
        x = data.images[s:s + batch_size].to(device).float().div_(255.0)
        y = data.labels[s:s + batch_size].to(device)
        f0 = nfe_totals(model)[0]
        correct += int((model(x).argmax(1) == y).sum())
        nfe_img += (nfe_totals(model)[0] - f0) * len(y)
    return {"accuracy": correct / len(data), "nfe_per_image": nfe_img / len(data)}


class _Progress:
    """A one-line progress bar on interactive terminals; silent otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()

    def update(self, prefix: str, done: int, total: int, loss: torch.Tensor):
        if self.enabled:  # reading the loss syncs the device: only when a bar is shown
            bar = "#" * int(24 * done / total)
            sys.stderr.write(f"\r{prefix} [{bar:<24}] {done}/{total} loss {float(loss.detach()):.4f}")
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\r\033[K")


def fit(model, cfg: RecipeConfig, train: ImageSet, test: ImageSet, *, loss_fn, name: str = "model",
        resume: dict | None = None, on_epoch=None, log=None, progress: bool = True) -> list[dict]:
    """Trains ``model`` for cfg's epochs; returns one metrics dict per epoch.

    loss_fn(batch, logits) -> scalar loss. ``resume`` is a dict from ``on_epoch``'s state
    (model, optimizer, epoch, history); batches of epoch e depend only on (seed, e), so a resumed
    run continues exactly. ``on_epoch(metrics, state)`` is called after every epoch.
    """
    device = cfg.torch_device()
    model.to(device)
    epochs = cfg.resolved_epochs()
    pad, flip = cfg.augment()
    batches = Batches(train, batch_size=cfg.batch_size, device=device, shuffle=True,
                      crop_padding=pad, flip=flip, seed=cfg.seed)
    test = test.to(device)
    opt = make_optimizer(cfg, model.parameters())
    base_lr = cfg.resolved_lr()
    history, start = [], 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        history, start = list(resume["history"]), int(resume["epoch"])
    writer = _tensorboard(cfg.log_dir)
    bar = _Progress(progress)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    for epoch in range(start, epochs):
        lr = base_lr * lr_factor(epoch, epochs, cfg.lr_milestones, cfg.lr_factors)
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        batches.set_epoch(epoch)
        t0 = time.perf_counter()
        tot_loss = torch.zeros((), device=device)
        tot_correct = torch.zeros((), device=device, dtype=torch.int64)
        nfe_f = nfe_b = 0
        ref0 = _nfe_reference(model)
        for i, batch in enumerate(batches):
            f0, b0 = nfe_totals(model)
            try:
                logits = model(batch.x)
                f1 = nfe_totals(model)[0]
                loss = loss_fn(batch, logits)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            except torch.OutOfMemoryError as e:
                raise out_of_memory(name, cfg, device, e) from None
            opt.step()
            n = len(batch.y)
            nfe_f += (f1 - f0) * n
            nfe_b += (nfe_totals(model)[1] - b0) * n
            tot_loss += loss.detach() * n
            tot_correct += (logits.argmax(1) == batch.y).sum()
            bar.update(f"{name} epoch {epoch + 1}/{epochs}", i + 1, len(batches), loss)
        bar.close()
        ref_solve = (_nfe_reference(model) - ref0) / max(len(batches), 1)
        ntr = len(train)
        if not torch.isfinite(tot_loss):  # checked once an epoch: a per-batch check syncs the GPU
            raise FloatingPointError(f"{name}: the training loss became {float(tot_loss)} in epoch {epoch + 1}")
        ev = evaluate(model, test, batch_size=cfg.eval_batch_size, device=device, computation=cfg.eval_computation)
        metrics = {
            "epoch": epoch + 1, "loss": float(tot_loss) / ntr, "train_accuracy": int(tot_correct) / ntr,
            "test_accuracy": ev["accuracy"], "lr": lr, "nfe_forward": nfe_f / ntr, "nfe_backward": nfe_b / ntr,
            "nfe_test": ev["nfe_per_image"], "seconds": time.perf_counter() - t0,
        }
        ref = ""
        if ref_solve:   # step_control "noise-aware": fp32 evaluations of f without backward, 2 per solve
            metrics["nfe_reference"] = ref_solve
            ref = f" (+{ref_solve:.1f} fp32)"
        history.append(metrics)
        log(f"{name} epoch {epoch + 1}/{epochs}  loss {metrics['loss']:.4f}  train {metrics['train_accuracy']:.4f}  "
            f"test {metrics['test_accuracy']:.4f}  lr {lr:.2g}  nfe f/b {metrics['nfe_forward']:.1f}/"
            f"{metrics['nfe_backward']:.1f}{ref}  {metrics['seconds']:.1f}s")
        if writer is not None:
            for k, v in metrics.items():
                if k != "epoch":
                    writer.add_scalar(f"{name}/{k}", v, epoch + 1)
            writer.flush()
        if on_epoch is not None:
            on_epoch(metrics, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                               "epoch": epoch + 1, "history": history})
    if writer is not None:
        writer.close()
    return history


def _nfe_reference(model) -> int:
    return getattr(getattr(model, "func", None), "nfe_reference", 0)


def out_of_memory(name: str, cfg: RecipeConfig, device, error: Exception) -> ConfigError:
    """A one-line error for a training step that does not fit in the device's memory.

    With plain backpropagation through dopri5, a student's activation memory grows with the
    number of function evaluations (NFE), which grows with the horizon; the adjoint method keeps
    it at one evaluation's. The first step's NFE is reached within seconds of the start, so in
    practice this fires before any epoch has finished (nothing but the "running" record is written).
    """
    where = str(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        where = f"{torch.cuda.get_device_name(device)} ({total:.0f} GiB; {peak:.1f} GiB in use at the failure)"
    hints = [f"a smaller batch (now {cfg.batch_size})"]
    node = getattr(cfg, "node", None)
    if node is not None and not node.adjoint:
        hints.insert(0, "the adjoint method (adjoint: memory of one function evaluation, not of every one)")
        if not (node.recompute and node.solver_impl_used() == "nodekd") and node.solver == "dopri5" \
                and (node.time_conv == "aligned" or node.time_input == "none"):
            hints.insert(0, "recompute and solver_impl nodekd (about half the memory per function evaluation)")
    if node is not None and node.precision != "bf16":
        hints.append("precision bf16")
    return ConfigError("batch_size", f"{name} does not fit in the memory of {where}: "
                                     f"{str(error).splitlines()[0][:120] if str(error) else 'out of memory'}; "
                                     f"use {', or '.join(hints)}, or a GPU with more memory")


def _tensorboard(log_dir):
    if not log_dir:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir)


# ----------------------------------------------------------------------------- recipes


def _load(cfg: RecipeConfig) -> tuple[ImageSet, ImageSet]:
    train, test = load_dataset(cfg.dataset, root=cfg.data_root, download=cfg.download,
                               synthetic_sizes=tuple(cfg.synthetic_sizes))
    return train.take(cfg.limit_train), test.take(cfg.limit_test)


def _seed(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def train_teacher(cfg: TeacherConfig, *, data=None, **fit_kw):
    """Returns (model, history, checkpoint fields). ``data`` = (train, test) skips loading."""
    cfg.validate()
    train, test = data if data is not None else _load(cfg)
    _seed(cfg.seed)
    mean, std = channel_stats(train.images)
    model = build_model(cfg.model, num_classes=train.num_classes, mean=mean, std=std)
    history = fit(model, cfg, train, test, loss_fn=lambda b, logits: F.cross_entropy(logits, b.y),
                  name=cfg.model, **fit_kw)
    ckpt = dict(arch=cfg.model, num_classes=train.num_classes, mean=mean, std=std,
                meta={"config": _jsonable(cfg.to_dict()), "history": history,
                      "test_accuracy": history[-1]["test_accuracy"], "eval_computation": cfg.eval_computation})
    return model, history, ckpt


def teacher_logits_for(cfg: StudentConfig, train: ImageSet, *, teacher=None, table=None) -> TeacherLogits | None:
    """Builds the soft-target source of a student run; computes the table from the teacher if not given."""
    if not cfg.kd:
        return None
    device = cfg.torch_device()
    pad, _ = cfg.augment()
    if cfg.logits_mode == "online":
        if teacher is None:
            raise ConfigError("teacher", "logits_mode 'online' needs a teacher checkpoint")
        return TeacherLogits("online", teacher=teacher, device=device)
    if table is None:
        if teacher is None:
            raise ConfigError("teacher", "KD needs a teacher checkpoint or a precomputed logit table")
        table = compute_logit_table(teacher, train, mode=cfg.logits_mode, crop_padding=pad, device=device)
    if len(table) != len(train):
        raise ConfigError("teacher", f"logit table has {len(table)} rows, the training set {len(train)}")
    if cfg.logits_mode == "views" and table.shape[1] != num_views(pad):
        raise ConfigError("crop_padding", f"the views table has {table.shape[1]} views; padding {pad} needs {num_views(pad)}")
    return TeacherLogits(cfg.logits_mode, table=table, device=device)


def train_student(cfg: StudentConfig, *, teacher=None, table=None, data=None, soft_out: dict | None = None, **fit_kw):
    """A NODE student, with KD (teacher model or precomputed table) or without. Returns (model, history, ckpt).

    soft_out: a dict that receives the soft-target source as "soft" (to read its teacher_forwards).
    """
    cfg.validate()
    if cfg.node.norm_impl == "triton" and cfg.torch_device().type != "cuda":
        if not speed_part("fused_norm").interpreting():
            raise ConfigError("norm_impl", f"'triton' runs its kernels on a CUDA device; this job runs on "
                                           f"{cfg.torch_device()} (use norm_impl torch)")
    train, test = data if data is not None else _load(cfg)
    soft = teacher_logits_for(cfg, train, teacher=teacher, table=table)
    if soft_out is not None:
        soft_out["soft"] = soft
    _seed(cfg.seed)
    mean, std = channel_stats(train.images)
    node = asdict(cfg.node)
    model = build_model("node", num_classes=train.num_classes, mean=mean, std=std, node=node)
    if soft is None:
        loss_fn = lambda b, logits: F.cross_entropy(logits, b.y)  # noqa: E731
    else:
        loss_fn = lambda b, logits: kd_loss(logits, soft(b.x, b.index, b.view), b.y, T=cfg.T, lam=cfg.lam)  # noqa: E731
    name = f"node{cfg.node.t1:g}" + ("-kd" if cfg.kd else "")
    history = fit(model, cfg, train, test, loss_fn=loss_fn, name=name, **fit_kw)
    ckpt = dict(arch="node", num_classes=train.num_classes, mean=mean, std=std, node=node,
                meta={"config": _jsonable(cfg.to_dict()), "history": history,
                      "test_accuracy": history[-1]["test_accuracy"], "eval_computation": cfg.eval_computation,
                      "teacher_forwards": soft.teacher_forwards if soft is not None else 0})
    return model, history, ckpt


def save_trained(path: str, model, ckpt: dict) -> None:
    save_checkpoint(path, model, **ckpt)


def _jsonable(obj):
    """Config dicts -> plain JSON types (tuples become lists), so weights_only loading works."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def with_overrides(cfg, **kw):
    """dataclasses.replace that also accepts NODEConfig fields for a StudentConfig."""
    node_fields = set(NODEConfig.__dataclass_fields__)
    node_kw = {k: kw.pop(k) for k in list(kw) if k in node_fields}
    if node_kw:
        kw["node"] = replace(cfg.node, **node_kw)
    return replace(cfg, **kw)
