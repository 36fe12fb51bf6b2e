"""The paper's grid as jobs: job keys, the plan of a sweep (which teachers, students and attack chunks), and the
settings shared by every sweep in one storage folder. Plain data over the config dataclasses; work.py does each
job's work, schedule.py orders them, ``orchestration`` runs them as Ray Tune trials and Ray tasks.

Storage layout (one folder per experiment, a local path or a URI such as s3://bucket/prefix; see
storage.py; every file written atomically):

    settings.json                        scale settings shared by every sweep using this folder
    lock.json                            the running sweep's lock (lock.py): host, pid, heartbeat
    plans/{sweep}.json                   what each sweep set out to make (for `nodekd verify`)
    models/{key}.pt                      finished models (checkpoints.save_checkpoint format)
    records/{key}.json                   trial records: status, attempts, config, history, error,
                                         and the model file's size and SHA-256
    logits/{teacher}-{mode}.npy|.json    teacher logit tables and how they were made
    results/attacks/dataset=D/attack=A/{model}-{attack}-eps{a}-{b}.parquet   attack results (ATTACK_SCHEMA)
    tensorboard/{key}/                   per-trial event files (scalars + hparams)
    tune/                                Ray Tune's experiment folders (trial checkpoints)
    report/                              tables and figure (nodekd report)

Keys name a job by what it is, so sweeps that share a storage folder share work: a teacher
trained for Table 1 is reused by Table 2, and a rerun skips every job whose output checks out.
Every artifact is verified when it is read (Storage.done / model_problem, logits_problem,
attack_problem): a damaged or stale one is reported in one line and redone.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .attacks import COMPUTATIONS, NODE_ONLY, TRANSFER, AuditConfig
from .errors import ConfigError, check_choice
from .computation import speed_settings
from .models import NODEConfig
from .presets import SweepSpec
from .train import RecipeConfig, StudentConfig, TeacherConfig


# ----------------------------------------------------------------------------- jobs


def _num(x: float) -> str:
    return f"{float(x):g}"


@dataclass(frozen=True)
class TeacherJob:
    dataset: str
    arch: str
    seed: int = 0

    @property
    def key(self) -> str:
        return f"teacher-{self.dataset}-{self.arch}-s{self.seed}"

    kind = "teacher"


@dataclass(frozen=True)
class StudentJob:
    dataset: str
    t1: float
    seed: int = 0
    teacher: str | None = None      # None: trained without KD
    T: float | None = None
    lam: float | None = None
    logits_mode: str | None = None

    @property
    def kd(self) -> bool:
        return self.teacher is not None

    @property
    def kind(self) -> str:
        return "node_kd" if self.kd else "node"

    @property
    def key(self) -> str:
        if not self.kd:
            return f"node-{self.dataset}-t{_num(self.t1)}-s{self.seed}"
        mode = "" if self.logits_mode == "paper" else f"-{self.logits_mode}"
        return (f"kd-{self.dataset}-t{_num(self.t1)}-{self.teacher}-T{_num(self.T)}"
                f"-lam{_num(self.lam)}{mode}-s{self.seed}")

    @property
    def teacher_job(self) -> TeacherJob | None:
        return TeacherJob(self.dataset, self.teacher, self.seed) if self.kd else None


@dataclass(frozen=True)
class AttackJob:
    model_key: str
    dataset: str
    attack: str
    eps_255: tuple
    source: str = ""          # transfer attacks: the key of the model the images are made on

    @property
    def key(self) -> str:
        return f"{self.model_key}-{self.attack}-eps{_num(self.eps_255[0])}-{_num(self.eps_255[-1])}"


@dataclass
class Plan:
    teachers: list = field(default_factory=list)
    students: list = field(default_factory=list)
    attacks: list = field(default_factory=list)

    def jobs(self) -> list:
        return self.teachers + self.students


def plan(specs, *, eps_per_task: int = 4) -> Plan:
    """The union of the specs' jobs, each once, in a stable order."""
    if eps_per_task < 1:
        raise ConfigError("eps_per_task", f"must be >= 1, got {eps_per_task}")
    p = Plan()
    seen = set()

    def add(lst, job):
        if job.key not in seen:
            seen.add(job.key)
            lst.append(job)

    for spec in specs:
        spec.validate()
        models = []
        for ds in spec.datasets:
            for seed in spec.seeds:
                for arch in list(spec.teachers) + [t for t in spec.kd_teachers if t not in spec.teachers]:
                    job = TeacherJob(ds, arch, seed)
                    add(p.teachers, job)
                    if spec.attack_teachers:
                        models.append(job)
                for t1 in spec.baseline_horizons:
                    job = StudentJob(ds, float(t1), seed)
                    add(p.students, job)
                    models.append(job)
                for arch in spec.kd_teachers:
                    for T in spec.temperatures:
                        for t1 in spec.kd_horizons:
                            for lam in spec.lam:
                                job = StudentJob(ds, float(t1), seed, arch, float(T), float(lam), spec.logits_mode)
                                add(p.students, job)
                                models.append(job)
        eps = sorted(set(float(e) for e in spec.eps_255))
        trained = {j.key for j in p.jobs()}
        for job in models:
            for attack in spec.attacks:
                source = transfer_source(job, attack, spec)
                if (attack in NODE_ONLY and isinstance(job, TeacherJob)) or (attack in TRANSFER and source not in trained):
                    continue   # no solver to change, or no source model in this plan (see transfer_source)
                for i in range(0, len(eps), eps_per_task):
                    add(p.attacks, AttackJob(job.key, job.dataset, attack, tuple(eps[i:i + eps_per_task]),
                                             source or ""))
    return p


def transfer_source(job, attack: str, spec: SweepSpec) -> str | None:
    """The model whose adversarial images a transfer attack evaluates on ``job``, or None.

    transfer-teacher: a KD student's own teacher; a no-KD NODE gets the sweep's first teacher
    (same data set and seed). transfer-node: a KD student gets the no-KD NODE of its horizon and
    seed. A ResNet teacher, and a no-KD NODE under transfer-node, have no source (it would be
    the model itself): those jobs are not planned.
    """
    if isinstance(job, TeacherJob) or attack not in TRANSFER:
        return None
    if attack == "transfer-teacher":
        if job.kd:
            return job.teacher_job.key
        first = (tuple(spec.kd_teachers) + tuple(spec.teachers))[:1]
        return TeacherJob(job.dataset, first[0], job.seed).key if first else None
    return StudentJob(job.dataset, job.t1, job.seed).key if job.kd else None



# ----------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Scale settings shared by every sweep that writes into one storage folder.

    teacher / student: overrides of train.TeacherConfig / StudentConfig fields (and NODEConfig
    fields for students), e.g. {"epochs": 2, "width": 16}; empty means the paper's recipe.
    """
    teacher: dict = field(default_factory=dict)
    student: dict = field(default_factory=dict)
    attack_images: int | None = 1000   # first N test images attacked (paper silent; None = all)
    attack_batch_size: int = 250       # fixed attack batches (dopri5's step is per batch)
    eps_per_task: int = 4              # eps values per attack task
    audit: dict = field(default_factory=dict)   # attacks.AuditConfig overrides; empty: full strength
    # what attacks and their clean pass compute on (attacks.COMPUTATIONS): the reference computation whatever
    # the students were trained with, or "as-trained" (their speed settings; rows say which)
    eval_computation: str = "reference"

    def validate(self) -> "Settings":
        teacher_config(TeacherJob("digits", "resnet20"), self).validate()
        student_config(StudentJob("digits", 1.0, 0, "resnet20", 10.0, 0.9, "paper"), self).validate()
        if self.attack_images is not None and self.attack_images < 1:
            raise ConfigError("attack_images", f"must be >= 1, got {self.attack_images}")
        if self.attack_batch_size < 1:
            raise ConfigError("attack_batch_size", f"must be >= 1, got {self.attack_batch_size}")
        self.audit_config()
        check_choice("eval_computation", self.eval_computation, COMPUTATIONS)
        return self

    def audit_config(self) -> AuditConfig:
        try:
            return AuditConfig(**self.audit).validate()
        except TypeError as e:
            raise ConfigError("audit", f"unknown setting: {e}") from None

    def to_dict(self) -> dict:
        d = json.loads(json.dumps(asdict(self)))
        if not d["audit"]:      # folders made before the audit existed keep matching
            del d["audit"]
        if d["eval_computation"] == "reference":   # and those made before evaluation had a choice
            del d["eval_computation"]
        return d


def student_config(job: StudentJob, settings: Settings, **extra) -> StudentConfig:
    kw = dict(settings.student)
    node_fields = set(NODEConfig.__dataclass_fields__)
    node_kw = {k: kw.pop(k) for k in list(kw) if k in node_fields}
    speed = kw.pop("speed", "default")       # --speed: resolved for the device the student trains on
    device_type = RecipeConfig(device=str(extra.get("device", kw.get("device", "auto")))).torch_device().type
    node = NODEConfig(**{**speed_settings(speed, device_type), **node_kw}, t1=job.t1)
    try:
        return StudentConfig(dataset=job.dataset, seed=job.seed, node=node, kd=job.kd,
                             T=job.T if job.kd else 10.0, lam=job.lam if job.kd else 0.9,
                             logits_mode=job.logits_mode or "paper", eval_computation=settings.eval_computation,
                             **kw, **extra)
    except TypeError as e:
        raise ConfigError("student", f"unknown setting: {e}") from None


def teacher_config(job: TeacherJob, settings: Settings, **extra) -> TeacherConfig:
    try:
        return TeacherConfig(dataset=job.dataset, model=job.arch, seed=job.seed, **settings.teacher, **extra)
    except TypeError as e:
        raise ConfigError("teacher", f"unknown setting: {e}") from None


def job_config(job, settings):
    """The job's TeacherConfig or StudentConfig under these settings."""
    return (teacher_config if isinstance(job, TeacherJob) else student_config)(job, settings)
