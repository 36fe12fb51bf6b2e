"""The paper's sweeps and the scales they run at: what to train and attack (SweepSpec, PRESETS) and the
settings presets (--scale paper|digits|demo|smoke: SCALES). Plain data; jobs.py turns them into jobs."""
from __future__ import annotations

from dataclasses import dataclass

from .attacks import ATTACKS, AUDIT_ATTACKS, parse_eps
from .config_cli import opt
from .data import DATASETS
from .errors import ConfigError, check_choice, check_range
from .kd import LOGIT_MODES, validate_kd
from .models import RESNET_DEPTHS

TEACHERS = tuple(RESNET_DEPTHS)            # resnet20 ... resnet110
EPS_255_PAPER = tuple(range(21))           # 0, 1, ..., 20 (/255), paper section 4.3.1
SWEEP_ATTACKS = ("pgd", "mifgsm")

# --smoke-test: tiny models, few epochs, small subsets; minutes on a laptop CPU.
SMOKE = {
    "teacher": {"epochs": 5, "batch_size": 32, "limit_train": 1024, "limit_test": 256},
    "student": {"epochs": 3, "batch_size": 64, "limit_train": 1024, "limit_test": 256,
                "width": 16, "stem_channels": 8},
    "attack_images": 64,
    "eps_255": (0, 4, 8, 12, 16, 20),
    # audit attacks at plumbing strength
    "audit": {"steps": 5, "long_steps": 10, "restarts": 2, "apgd_steps": 5, "square_queries": 20, "rk4_steps": 4},
}

# --scale digits (the audit's default): the 3-seed digits study (README, "The digits study"), about
# 55 min on 2 CPU cores. Not the paper's scale, each choice measured on digits (README):
#  * students of width 32 (stem 16) instead of 512, batch 32 (digits has 1437 training images), Adam:
#    under the paper's rule (SGD at lr 0.001 for a KD student at t1 = 1) a digits student barely
#    leaves chance in 10 epochs;
#  * 20 student epochs, lr kept to 3/4 of them: digits NODEs leave chance only after ~150 steps
#    (3 epochs of 45), and the paper's drop at 1/2 would cut their lr as they start; with 15 epochs
#    the KD students at t1 = 10 (slowest to learn) ended at 84-93% clean, one seed under 85%;
#  * students train without augmentation (crop_padding 0): the paper's teacher logits are those of
#    the clean image, and a KD student trained on crops of it learned far slower (43% vs 82% clean
#    after 8 epochs, T = 10, same seed);
#  * the audit's grid (grid["audit"]): T = 3 (T = 10 students learned far slower: 76-82% vs 91% clean
#    after 8 epochs) and horizons 1 and 10: NODE(100) with raw t stays near chance at this width
#    and schedule (10-29% after 3 epochs), NODE(10) learns;
#  * 100 attacked images, eps 0, 4, 8, 16/255, and the audit attacks at reduced strength
#    (AuditConfig's defaults are the full ones).
DIGITS = {
    "teacher": {"epochs": 15, "batch_size": 32},
    "student": {"epochs": 20, "batch_size": 32, "width": 32, "stem_channels": 16, "optimizer": "adam",
                "lr_milestones": (0.75, 0.9), "crop_padding": 0},
    "attack_images": 100,
    "eps_255": (0, 4, 8, 16),
    "audit": {"steps": 10, "long_steps": 40, "restarts": 2, "apgd_steps": 20, "square_queries": 100, "rk4_steps": 6},
    "grid": {"audit": {"temperatures": (3.0,), "kd_horizons": (1.0, 10.0), "baseline_horizons": (1.0, 10.0)}},
}
# --scale demo (make demo): --scale digits cut to fit about 10 minutes on 2 CPU cores with one seed:
# a 5-epoch teacher, 8 student epochs, 50 attacked images.
DEMO = {
    "teacher": {"epochs": 5, "batch_size": 32},
    "student": {**DIGITS["student"], "epochs": 8},
    "attack_images": 50,
    "eps_255": DIGITS["eps_255"],
    "audit": DIGITS["audit"],
    "grid": {"audit": {"temperatures": (3.0,), "kd_horizons": (1.0,), "baseline_horizons": (1.0,)}},
}
SCALES = {"paper": {}, "digits": DIGITS, "demo": DEMO, "smoke": SMOKE}


def eps_255_from_text(values) -> tuple:
    """--eps's values, as ``nodekd attack`` reads them (pixel units in [0, 1], fractions like 8/255, space- or
    comma-separated), in the 1/255 units of SweepSpec.eps_255."""
    return tuple(round(e * 255, 6) for e in parse_eps(",".join(str(v) for v in values)))


@dataclass
class SweepSpec:
    """One sweep: which teachers and students to train and which models to attack. The fields with help are the
    sweep scripts' grid options, of the same names as nodekd's (orchestration/entry.py generates them)."""
    name: str                                  # e.g. "table2"; names the Tune experiments
    datasets: tuple = opt(("cifar10", "svhn"), "data sets", flag="dataset", choices=DATASETS, metavar="NAME")
    # teachers trained (and reported) as baselines; --teacher sets these and kd_teachers, whichever the sweep has
    teachers: tuple = opt((), "teacher ResNets (trained, attacked, and distilled into the sweep's students)",
                          flag="teacher", aliases=("teachers",), choices=TEACHERS, metavar="ARCH")
    kd_teachers: tuple = ()                    # teachers distilled into students (trained too)
    temperatures: tuple = opt((3.0, 10.0, 20.0), "KD temperatures (paper grid: 3 10 20)", flag="T",
                              aliases=("temperatures",), metavar="T")
    kd_horizons: tuple = opt((1.0, 100.0), "horizons t1 of the KD students (paper: 1 100)", flag="t1",
                             aliases=("horizons",), metavar="T1")
    baseline_horizons: tuple = opt((), "horizons t1 of the NODE students trained without KD", flag="baseline_t1",
                                   aliases=("baseline_horizons",), metavar="T1", type=float)
    lam: tuple = opt((0.9,), "weights of the KD term, in [0, 1] (paper: 0.9)", metavar="LAM")
    logits_mode: str = opt("paper", "teacher logits: paper (once, on clean images), views or online; see "
                                    "nodekd_ray/kd.py", choices=LOGIT_MODES)
    seeds: tuple = (0,)
    attacks: tuple = opt((), "attacks (paper: pgd mifgsm; the audit's: nodekd_ray/attacks.py); none: clean "
                             "accuracy only", flag="attack", aliases=("attacks",), choices=ATTACKS, metavar="NAME")
    eps_255: tuple = opt(EPS_255_PAPER, "attack strengths as nodekd attack takes them: pixel units in [0, 1], "
                                        "fractions like 8/255, space- or comma-separated (paper: 0 to 20/255)",
                         flag="eps", type=str, convert=eps_255_from_text, metavar="EPS")
    attack_teachers: bool = True               # attack the teachers too (Figure 1's ResNet curve)

    def __post_init__(self):
        if isinstance(self.lam, (int, float)):     # one value, as SweepSpec took it before lam became a grid axis
            self.lam = (float(self.lam),)

    def validate(self) -> "SweepSpec":
        if not self.datasets:
            raise ConfigError("dataset", "at least one data set is needed")
        for d in self.datasets:
            check_choice("dataset", d, DATASETS)
        for t in tuple(self.teachers) + tuple(self.kd_teachers):
            check_choice("teacher", t, TEACHERS)
        if not self.lam:
            raise ConfigError("lam", "at least one value is needed")
        for lam in self.lam:
            for T in self.temperatures:
                validate_kd(T, lam)
            validate_kd(10.0, lam)
        for t1 in tuple(self.kd_horizons) + tuple(self.baseline_horizons):
            check_range("horizon", t1, 0, None, lo_open=True)
        check_choice("logits_mode", self.logits_mode, LOGIT_MODES)
        for a in self.attacks:
            check_choice("attack", a, ATTACKS)
        for e in self.eps_255:
            check_range("eps", e, 0, 255)
        if self.kd_teachers and not (self.temperatures and self.kd_horizons):
            raise ConfigError("temperature", "KD students need at least one temperature and one horizon")
        return self


# ----------------------------------------------------------------------------- the paper's sweeps

# Figure 1's KD students: the paper does not say which teacher and T it plots; ResNet44 at
# T = 10 is its best CIFAR10 student (Table 2). --teachers / --temperatures change it.
PRESETS = {
    "table1": SweepSpec("table1", teachers=TEACHERS, baseline_horizons=(1.0, 100.0)),
    "table2": SweepSpec("table2", kd_teachers=TEACHERS, temperatures=(3.0, 10.0, 20.0), kd_horizons=(1.0, 100.0)),
    "table3": SweepSpec("table3", datasets=("cifar10",), baseline_horizons=(500.0,), attacks=("pgd",),
                        eps_255=(0, 8, 12, 16, 20)),
    "figure1": SweepSpec("figure1", kd_teachers=("resnet44",), temperatures=(10.0,), kd_horizons=(1.0, 100.0),
                         baseline_horizons=(1.0, 100.0), attacks=SWEEP_ATTACKS),
    # The attack audit (sweeps/audit.py): Figure 1's four NODEs and their teacher, three seeds, under
    # the paper's attacks and every audit attack. Digits by default (--scale digits), whose grid
    # (DIGITS["grid"]) replaces T and the horizons with ones a width-32 digits student learns at.
    "audit": SweepSpec("audit", datasets=("digits",), kd_teachers=("resnet20",), temperatures=(10.0,),
                       kd_horizons=(1.0, 100.0), baseline_horizons=(1.0, 100.0), seeds=(0, 1, 2),
                       attacks=SWEEP_ATTACKS + AUDIT_ATTACKS),
}
