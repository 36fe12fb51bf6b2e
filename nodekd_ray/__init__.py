"""nodekd_ray: knowledge distillation from ResNets into Neural ODEs, and attacks on them.

The core (data, models, KD, training, attacks, results) is plain PyTorch; only
``nodekd_ray.orchestration`` imports Ray.
"""
from .attacks import attack_sweep, fgsm, mifgsm, pgd, steps_for_eps
from .data import Batches, ImageSet, load_dataset
from .errors import ConfigError
from .kd import TeacherLogits, compute_logit_table, kd_loss
from .checkpoints import build_model, load_checkpoint, save_checkpoint
from .models import NODEConfig, NeuralODE, ODESolveError
from .train import StudentConfig, TeacherConfig, train_student, train_teacher

__all__ = [
    "attack_sweep", "fgsm", "mifgsm", "pgd", "steps_for_eps", "Batches", "ImageSet", "load_dataset",
    "ConfigError", "TeacherLogits", "compute_logit_table", "kd_loss", "NODEConfig", "NeuralODE",
    "ODESolveError", "build_model", "load_checkpoint", "save_checkpoint", "StudentConfig",
    "TeacherConfig", "train_student", "train_teacher",
]
from ._version import __version__  # noqa: E402
