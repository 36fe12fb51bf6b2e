"""Knowledge distillation (the paper's Algorithm 1) and teacher-logit tables.

Loss: L = (1 - lam) * CE(l_N, y) + lam * T^2 * KL(softmax(l_R / T) || softmax(l_N / T)),
each term a batch mean. (torchdistill's ``alpha`` weights the CE term: lam = 0.9 is alpha 0.1.)

Teacher logits come in three modes:
  * ``paper``:  computed once on the un-augmented training images (Algorithm 1, line 1) and
                looked up by image index; the student may see a cropped/flipped view.
  * ``views``:  computed once for every crop x flip view ((2p+1)^2 * 2 = 162 for p = 4) and
                looked up by (image, view), so the soft target matches what the student sees.
  * ``online``: a teacher forward on each augmented batch.
``paper`` and ``views`` tables are plain numpy arrays (float32 (N, K); float16 (N, V, K)), so a
sweep can share them (Ray's object store) without shipping the teacher.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .data import ImageSet, crop_flip, identity_view, num_views, pad_images
from .errors import check_choice, check_range

LOGIT_MODES = ("paper", "views", "online")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            *, T: float, lam: float) -> torch.Tensor:
    """Algorithm 1, lines 5-10. logits: (B, K); labels: (B,)."""
    ce = F.cross_entropy(student_logits, labels)
    kl = F.kl_div(F.log_softmax(student_logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1),
                  reduction="batchmean", log_target=True)  # KL(teacher || student), batch mean
    return (1.0 - lam) * ce + lam * T * T * kl


def validate_kd(T: float, lam: float) -> None:
    check_range("T", T, 0, None, lo_open=True)
    check_range("lam", lam, 0, 1)


@torch.no_grad()
def compute_logit_table(teacher: torch.nn.Module, train: ImageSet, *, mode: str, crop_padding: int = 4,
                        batch_size: int = 1000, device="cpu", progress=None) -> np.ndarray:
    """The teacher's logits, computed once: (N, K) float32 for "paper", (N, V, K) float16 for "views"."""
    check_choice("logits_mode", mode, ("paper", "views"))
    teacher = teacher.to(device).eval()
    padded = pad_images(train.images.to(device), crop_padding)
    n = len(train)
    views = [identity_view(crop_padding)] if mode == "paper" else list(range(num_views(crop_padding)))
    out = np.empty((n, len(views), train.num_classes), dtype=np.float32 if mode == "paper" else np.float16)
    index = torch.arange(n, device=device)
    for j, v in enumerate(views):
        for start in range(0, n, batch_size):
            idx = index[start:start + batch_size]
            x = crop_flip(padded, idx, torch.full_like(idx, v), crop_padding).float().div_(255.0)
            out[start:start + len(idx), j] = teacher(x).float().cpu().numpy()
        if progress is not None:
            progress(j + 1, len(views))
    return out[:, 0] if mode == "paper" else out


class TeacherLogits:
    """Looks up the soft-target logits for a batch, whichever the mode.

    For "paper"/"views" only the table is needed; for "online" only the teacher.
    ``teacher_forwards`` counts teacher forward passes made by this object (0 unless online).
    """

    def __init__(self, mode: str, *, table: np.ndarray | None = None, teacher: torch.nn.Module | None = None,
                 device="cpu"):
        check_choice("logits_mode", mode, LOGIT_MODES)
        self.mode = mode
        self.teacher_forwards = 0
        if mode == "online":
            if teacher is None:
                raise ValueError("online teacher logits need the teacher")
            self.teacher = teacher.to(device).eval()
            self.table = None
        else:
            if table is None:
                raise ValueError(f"{mode} teacher logits need a precomputed table")
            want = 2 if mode == "paper" else 3
            if table.ndim != want:
                raise ValueError(f"{mode} table must have {want} dimensions, got shape {table.shape}")
            # Zero-copy on the CPU: Ray's object store hands out read-only numpy arrays, and
            # torch.from_numpy shares their memory (the table is only ever read). On a GPU the
            # table is copied to the device once.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not writable.*")
                self.table = torch.from_numpy(np.asarray(table)).to(device)

    def __call__(self, x: torch.Tensor, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        if self.mode == "online":
            self.teacher_forwards += 1
            with torch.no_grad():
                return self.teacher(x).float()
        if self.mode == "paper":
            return self.table[index].float()
        return self.table[index, view].float()
