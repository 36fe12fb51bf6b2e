"""The cluster path as Ray's own launcher runs it, on this machine (tests/cluster_host.py; the machine is
prepared by .ci/cluster-host.sh):

- `ray up` with Ray's `local` node provider over SSH to 127.0.0.1, with cluster/gpu.yaml's file mounts,
  setup and start commands (its docker and AWS parts replaced: no cloud, no docker daemon here), then
  `ray submit` of a smoke sweep with an S3 URI among its arguments, complete results, `ray down`;
- the container's setup replayed as the image's user (uid 1000, gid 100) in the folder layout that Ray's
  docker mode makes (bind mounts under a folder docker creates as root), for today's config and for the
  config before this change (tests/data/gpu-yaml-2026-12-04.yaml), which fails;
- the Ray Jobs API: a local head with its dashboard, a sweep submitted with a working directory through
  JobSubmissionClient, stopped midway, and finished by a second job with --resume;
- cluster/kuberay/rayjob.yaml against KubeRay's published CRD schema, and cluster/Dockerfile's pins.
"""
from __future__ import annotations

import copy
import json
import os
import pwd
import re
import shlex
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from cluster_host import IMAGE_GID, IMAGE_UID, NODE_USER, as_user, fresh_tmp, image_site, need_host, node_image
from nodekd_ray import sweep as S
from test_orchestration import SUBSET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
DATA = os.path.join(ROOT, "tests", "data")
GPU_YAML = os.path.join(ROOT, "cluster", "gpu.yaml")
OLD_GPU_YAML = os.path.join(DATA, "gpu-yaml-2026-12-04.yaml")   # cluster/gpu.yaml at 362a448, before issue 26
SMOKE = ["--dataset", "digits", "--smoke-test", "--teachers", "resnet20", "--temperatures", "10", "--horizons", "1",
         "--baseline-horizons", "1", "--epochs", "1", "--attack-images", "16", *SUBSET]
# what figure1 writes with SMOKE: 3 models x 2 attacks x 6 eps
SMOKE_KEYS = {"teacher-digits-resnet20-s0", "node-digits-t1-s0", "kd-digits-t1-resnet20-T10-lam0.9-s0"}
SMOKE_ROWS = 3 * 2 * 6


def load(path):
    with open(path) as f:
        return yaml.safe_load(f)


def check_results(uri: str) -> None:
    st = S.Storage(uri)
    recs = {r["key"]: r for r in st.records()}
    assert set(recs) == SMOKE_KEYS and all(r["status"] == "done" for r in recs.values()), recs
    rows = S.read_attacks(st).to_pylist()
    assert len(rows) == SMOKE_ROWS and len({(x["model_key"], x["attack"], x["eps_255"]) for x in rows}) == SMOKE_ROWS


@pytest.fixture(scope="module")
def site():
    need_host()
    d = fresh_tmp("nodekd-image-")
    try:
        yield image_site(os.path.join(d, "site"))
    finally:
        subprocess.run(["rm", "-rf", d])


# ----------------------------------------------------------------------------- ray up / submit / down


def local_cluster_config(cfg: dict, *, name: str, user: str, key: str, shared: str) -> dict:
    """cluster/gpu.yaml for Ray's `local` provider on 127.0.0.1: the same file mounts, setup and start
    commands; the AWS parts (provider, node types, the host's EFS mount) and docker replaced. The values a
    user fills in get this machine's: /mnt/shared -> ``shared``. What cannot run offline is dropped and
    listed in ``dropped``: the head's download of CIFAR10/SVHN (no internet here)."""
    cfg = copy.deepcopy(cfg)
    for k in ("docker", "available_node_types", "head_node_type"):
        cfg.pop(k, None)
    cfg.update(cluster_name=name, max_workers=0,
               provider={"type": "local", "head_ip": "127.0.0.1", "worker_ips": []},
               auth={"ssh_user": user, "ssh_private_key": key},
               initialization_commands=[f"mkdir -p {shared}"])   # the host's EFS mount, here a folder

    def here(cmd: str) -> str:
        return cmd.replace("/mnt/shared", shared)

    for part in ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                 "worker_start_ray_commands"):
        cfg[part] = [here(c) for c in cfg.get(part, [])]
    cfg["dropped"] = [c for c in cfg["head_setup_commands"] if c.startswith("nodekd download")]
    cfg["head_setup_commands"] = [c for c in cfg["head_setup_commands"] if c not in cfg["dropped"]]
    return cfg


def ray_cli(*args, timeout=900, check=True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([os.path.join(BIN, "ray"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    if check and r.returncode:
        raise AssertionError(f"ray {' '.join(args)} exited {r.returncode}\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}")
    return r


@pytest.fixture
def node_user(site, s3):
    """The loopback node's user with a fresh home: the node image, an SSH key the launcher logs in with,
    and the credentials of the test's S3 server (a real node has its instance profile's)."""
    home = pwd.getpwnam(NODE_USER).pw_dir
    work = fresh_tmp("nodekd-launch-")
    key = os.path.join(work, "id_ed25519")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    os.chmod(work, 0o700)
    as_user(NODE_USER, "rm -rf ~/nodekd-ray ~/.nodekd_env ~/ray_bootstrap_config.yaml ~/ray_bootstrap_key.pem "
                       "~/*.py; mkdir -p ~/.ssh && chmod 700 ~/.ssh")
    with open(key + ".pub") as f:
        as_user(NODE_USER, f"echo {shlex.quote(f.read().strip())} > ~/.ssh/authorized_keys && "
                           "chmod 600 ~/.ssh/authorized_keys")
    from conftest import CREDENTIALS

    creds = "\n".join(f"export {k}={v}" for k, v in CREDENTIALS.items())
    # Ray's temporary folder of the node user's own (this machine's /tmp/ray belongs to the tests' Ray)
    node_image(NODE_USER, home, site, bashrc=f"{creds}\nexport RAY_TMPDIR=/tmp/nodekd-node-ray")
    shared = fresh_tmp("nodekd-shared-")
    os.chmod(shared, 0o777)
    try:
        yield {"home": home, "key": key, "shared": shared}
    finally:
        subprocess.run(["pkill", "-9", "-u", NODE_USER], capture_output=True)
        subprocess.run(["rm", "-rf", work, shared])


@pytest.mark.slow
@pytest.mark.serial   # `ray stop` and the head's fixed ports (6379, 8076): no other Ray instance beside it
def test_ray_up_submit_down_with_rays_launcher_on_loopback_nodes(node_user, s3, tmp_path):
    name = f"nodekd-test-{uuid.uuid4().hex[:6]}"
    cfg = local_cluster_config(load(GPU_YAML), name=name, user=NODE_USER, key=node_user["key"],
                               shared=node_user["shared"])
    assert cfg["dropped"] == [f"nodekd download cifar10 svhn --data-root {node_user['shared']}/data"]
    cfg.pop("dropped")
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.monotonic()
    try:
        up = ray_cli("up", "-y", "--no-config-cache", str(path))
        t_up = time.monotonic() - t0
        # file mounts and setup commands ran on the node, as its user
        r = as_user(NODE_USER, "ls ~/nodekd-ray ~/nodekd-ray/nodekd_ray/__init__.py; cat ~/.nodekd_env; "
                               "~/venv/bin/python -c 'import nodekd_ray, os; print(os.path.dirname(nodekd_ray.__file__))';"
                               " . ~/.bashrc; command -v nodekd")
        assert all(f"\n{n}\n" in r.stdout for n in ("README.md", "nodekd_ray", "pyproject.toml", "sweeps")), r.stdout
        assert f"NODEKD_DATA_ROOT={node_user['shared']}/data" in r.stdout
        assert f"{node_user['home']}/nodekd-ray/nodekd_ray\n" in r.stdout           # the editable install
        assert r.stdout.strip().endswith(f"{node_user['home']}/venv/bin/nodekd")
        # Ray runs on the node, started by the config's own start commands, as the node user
        status = as_user(NODE_USER, ". ~/.bashrc; ray status", check=False)
        assert status.returncode == 0 and "1 local.cluster.node" in status.stdout, status.stdout
        # `ray submit` of a smoke sweep; the URI's & and ? reach the script intact (README's quoting)
        uri = s3()
        t1 = time.monotonic()
        sub = ray_cli("submit", str(path), "sweeps/figure1.py", "--", *SMOKE, "--gpus-per-trial", "0",
                      "--storage", f"'{uri}'")
        t_submit = time.monotonic() - t1
        out = sub.stdout + sub.stderr
        assert "joined the Ray cluster at" in out, out[-4000:]
        check_results(uri)
    finally:
        t2 = time.monotonic()
        down = ray_cli("down", "-y", str(path), check=False)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    left = subprocess.run(["pgrep", "-u", NODE_USER, "-f", "raylet|gcs_server"], capture_output=True, text=True)
    assert left.stdout == "", f"Ray processes left after `ray down`: {left.stdout}"
    print(f"ray up {t_up:.0f}s, ray submit {t_submit:.0f}s, ray down {time.monotonic() - t2:.0f}s "
          f"({len(up.stdout.splitlines())} lines of `ray up` output)")


# ----------------------------------------------------------------------------- the container's setup


def replay_container_setup(cfg: dict, site: str, *, image_home="/home/ray") -> tuple[int, str]:
    """A GPU worker's container setup, replayed: the folders Ray's docker mode makes (each file_mounts
    entry bind-mounted on its own, docker creating the missing parents as root; the mounted files owned
    by the host's uid 1000), then the config's setup_commands and worker_setup_commands, each as Ray
    runs it in the container (its login-shell wrapper), as the image's user (uid 1000, gid 100).
    ``image_home``, the image's HOME, maps to a folder here. Returns (exit status, output)."""
    from ray.autoscaler._private.command_runner import _with_interactive

    base = fresh_tmp("nodekd-container-")
    home = os.path.join(base, "home", "ray")
    os.makedirs(home)
    os.chown(home, IMAGE_UID, IMAGE_GID)

    def inside(path: str) -> str:   # a path in the container -> here
        path = path.replace("~/", image_home + "/", 1) if path.startswith("~/") else path
        return path.replace(image_home, home, 1)

    for target, source in cfg["file_mounts"].items():
        dest = inside(target)
        os.makedirs(os.path.dirname(dest), exist_ok=True)         # docker: missing parents, as root, 755
        src = os.path.join(ROOT, source)
        if os.path.isdir(src):
            subprocess.run(["cp", "-r", src, dest], check=True)
        else:
            subprocess.run(["cp", src, dest], check=True)
        subprocess.run(["chown", "-R", f"{IMAGE_UID}:{IMAGE_UID}", dest], check=True)
    node_image(IMAGE_UID, home, site, gid=IMAGE_GID)
    out, rc = [], 0
    for cmd in cfg["setup_commands"] + cfg.get("worker_setup_commands", []):
        cmd = cmd.replace(image_home, home)
        r = as_user(IMAGE_UID, " ".join(_with_interactive(cmd)), gid=IMAGE_GID, home=home, check=False)
        out.append(f"$ {cmd}\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        if r.returncode:
            rc = r.returncode
            break
    if rc == 0:   # the installed package is the mounted one, importable by the image's python
        r = as_user(IMAGE_UID, ". ~/.bashrc; python -c 'import nodekd_ray; print(nodekd_ray.__file__)'; nodekd --help",
                    gid=IMAGE_GID, home=home, check=False)
        out.append(r.stdout + r.stderr)
        rc = r.returncode or (0 if f"{home}/nodekd-ray/nodekd_ray/__init__.py" in r.stdout else 99)
    subprocess.run(["rm", "-rf", base])
    return rc, "\n".join(out)


@pytest.mark.slow
def test_container_setup_as_the_images_user_succeeds_and_failed_before(site):
    rc, out = replay_container_setup(load(GPU_YAML), site)
    assert rc == 0, out[-6000:]
    assert "sudo chown" in out and "usage: nodekd" in out
    # the config before this change: pip cannot write the package's metadata into the root-owned folder
    rc, out = replay_container_setup(load(OLD_GPU_YAML), site)
    assert rc != 0 and "Permission denied" in out and "nodekd_ray.egg-info" in out, out[-6000:]


# ----------------------------------------------------------------------------- the Ray Jobs API


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A local Ray head with its dashboard (the Jobs API server), as `ray start --head` makes one."""
    gcs, dash = free_port(), free_port()
    # Ray 2.60 turns token authentication on for a head started where ~/.ray/auth_token exists (any local
    # ray.init() of the suite writes one); this test's client sends no token, so the head runs without
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"], RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    subprocess.run([os.path.join(BIN, "ray"), "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=300)
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([os.path.join(BIN, "ray"), "stop", "--force"], env=env, capture_output=True, timeout=300)


def wait_job(client, job_id, states, timeout=900):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        status = client.get_job_status(job_id)
        if str(status) in states or getattr(status, "value", None) in states:
            return str(getattr(status, "value", status))
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {client.get_job_status(job_id)} after {timeout}s:\n"
                         f"{client.get_job_logs(job_id)[-4000:]}")


# what `ray job submit --working-dir .` would upload, without the environment and results (.gitignore's)
WORKING_DIR = {"working_dir": ROOT, "excludes": [".venv", ".git", "runs", "data", "**/__pycache__", "*.egg-info"]}


@pytest.mark.slow
@pytest.mark.serial   # its head ends with `ray stop --force`
def test_jobs_api_submit_stop_and_resume_with_a_working_directory(ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head)
    store = str(tmp_path / "store")
    sweep = " ".join(["python", "sweeps/figure1.py", *SMOKE, "--gpus-per-trial", "0", "--storage", store])
    # a relative storage folder would live in the job's temporary copy of the working directory: refused
    bad = client.submit_job(entrypoint="python sweeps/figure1.py --dataset digits --smoke-test",
                            runtime_env=dict(WORKING_DIR, env_vars={"NODEKD_STORAGE": ""}))
    assert wait_job(client, bad, {"FAILED", "SUCCEEDED"}) == "FAILED"
    assert "error: storage: 'runs/nodekd-smoke' is relative, and this Ray job runs in a temporary copy" in \
        client.get_job_logs(bad)
    # a job stopped midway (Ray's stop: SIGTERM, SIGKILL 3 s later) ...
    first = client.submit_job(entrypoint=sweep, runtime_env=WORKING_DIR)
    t0 = time.monotonic()
    while not any(r.get("status") == "done" for r in S.Storage(store).records()) if os.path.isdir(store) else True:
        assert time.monotonic() - t0 < 600 and str(client.get_job_status(first)) not in ("FAILED", "SUCCEEDED",
                                                                                           "JobStatus.FAILED"), \
            client.get_job_logs(first)[-4000:]
        time.sleep(0.5)
    assert client.stop_job(first)
    assert wait_job(client, first, {"STOPPED", "FAILED", "SUCCEEDED"}) == "STOPPED"
    recs = S.Storage(store).records()
    assert 1 <= sum(r["status"] == "done" for r in recs) < len(SMOKE_KEYS) or len(S.read_attacks(S.Storage(store))) < SMOKE_ROWS
    # ... leaves a folder that a second job with --resume finishes
    second = client.submit_job(entrypoint=sweep + " --resume", runtime_env=WORKING_DIR)
    assert wait_job(client, second, {"FAILED", "SUCCEEDED", "STOPPED"}) == "SUCCEEDED", client.get_job_logs(second)[-4000:]
    logs = client.get_job_logs(second)
    assert "joined the Ray cluster at" in logs and "results:" in logs
    check_results(store)


# ----------------------------------------------------------------------------- KubeRay, the image, the pins

KUBERAY = os.path.join(DATA, "kuberay-v1.7.0")   # ray-operator/config/crd/bases/ray.io_rayjobs.yaml at v1.7.0


def crd_validator(path: str):
    """A JSON-schema validator for a CRD's v1 openAPIV3Schema, as strict as the API server's structural
    schema: an object with listed properties takes no others, unless the schema keeps unknown fields."""
    import jsonschema

    crd = load(path)
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]

    def strict(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for v in node.values():
                strict(v)
        elif isinstance(node, list):
            for v in node:
                strict(v)

    strict(schema)
    return jsonschema.Draft7Validator(schema)


def test_rayjob_manifest_validates_against_kuberays_crd():
    v = crd_validator(os.path.join(KUBERAY, "ray.io_rayjobs.yaml"))
    job = load(os.path.join(ROOT, "cluster", "kuberay", "rayjob.yaml"))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(job)]
    assert not errors, errors
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and "--resume" in spec["entrypoint"]
    assert "NODEKD_STORAGE: s3://" in spec["runtimeEnvYAML"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray_pin() and cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    images = {c["image"] for g in (head, gpu) for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1 and images.pop().endswith("/nodekd-ray:" + project_version())
    # the validator is strict: a misspelt field is an error, as the API server would refuse it
    bad = copy.deepcopy(job)
    bad["spec"]["shutdownAfterJobFinish"] = bad["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e.message for e in v.iter_errors(bad))
    bad = copy.deepcopy(job)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "zero"
    assert list(v.iter_errors(bad))


def ray_pin() -> str:
    import tomllib

    deps = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["dependencies"]
    (pin,) = [d.split("==")[1] for d in deps if d.startswith("ray[tune]==")]
    return pin


def project_version() -> str:
    """The version, written once in nodekd_ray/_version.py (pyproject.toml reads it from there)."""
    import re

    text = open(os.path.join(ROOT, "nodekd_ray", "_version.py")).read()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def torch_pair() -> list[str]:
    (line,) = [x for x in open(os.path.join(ROOT, "Makefile")) if x.startswith("TORCH_PAIR :=")]
    return line.split(":=")[1].split()


def test_dockerfile_and_cluster_configs_carry_the_projects_pins():
    docker = open(os.path.join(ROOT, "cluster", "Dockerfile")).read()
    (base,) = re.findall(r"^FROM (\S+)$", docker, re.M)
    assert base == f"rayproject/ray:{ray_pin()}-py312-gpu"
    assert f"pip install --no-cache-dir {' '.join(torch_pair())}\n" in docker
    assert '".[cluster,s3]"' in docker and f"ray.__version__ == '{ray_pin()}'" in docker
    for name in ("gpu.yaml", "gpu-image.yaml"):
        cfg = load(os.path.join(ROOT, "cluster", name))
        cmds = " ".join(cfg["setup_commands"] + cfg["head_setup_commands"] + cfg["worker_setup_commands"])
        assert f"ray.__version__ == '{ray_pin()}'" in cmds
        for part in ("head_setup_commands", "worker_setup_commands"):
            for c in cfg[part]:
                if "torch==" in c:
                    assert c.split()[3:5] == torch_pair(), c
    cfg = load(GPU_YAML)
    head, worker = cfg["head_setup_commands"][0], cfg["worker_setup_commands"][0]
    assert head.endswith("--index-url https://download.pytorch.org/whl/cpu")   # no CUDA torch on the CPU head
    assert "--index-url" not in worker
    assert cfg["docker"]["worker_image"] == f"rayproject/ray:{ray_pin()}-py312-gpu"


def test_the_image_config_is_gpu_yaml_but_for_its_image_parts():
    from ray.autoscaler._private.util import prepare_config, validate_config

    a, b = load(GPU_YAML), load(os.path.join(ROOT, "cluster", "gpu-image.yaml"))
    validate_config(prepare_config(copy.deepcopy(b)))
    assert b["file_mounts"] == {} and b["worker_setup_commands"] == []
    assert not any("pip install" in c for c in b["setup_commands"] + b["head_setup_commands"])
    assert b["docker"]["head_image"] == b["docker"]["worker_image"] != a["docker"]["worker_image"]
    assert b["initialization_commands"][:-1] == a["initialization_commands"]
    assert "docker login" in b["initialization_commands"][-1]
    assert b["setup_commands"] == [c for c in a["setup_commands"] if "nodekd_env" in c]
    assert b["head_setup_commands"][1:] == a["head_setup_commands"][3:]   # the data download
    same = set(a) - {"docker", "file_mounts", "rsync_exclude", "initialization_commands", "setup_commands",
                     "head_setup_commands", "worker_setup_commands"}
    assert {k: a[k] for k in same} == {k: b[k] for k in same}
    assert {k: v for k, v in a["docker"].items() if not k.endswith("image") and k != "pull_before_run"} == \
        {k: v for k, v in b["docker"].items() if not k.endswith("image") and k != "pull_before_run"}


def config_problems(cfg: dict) -> list[str]:
    """Issue 26's defects of a launcher config that a loopback run cannot show (they live in its AWS and
    docker parts), each as one line."""
    out = []
    docker = cfg.get("docker", {})
    if "--gpus all" not in docker.get("worker_run_options", []) + docker.get("run_options", []):
        out.append("GPU passthrough left to Ray's detection of docker's runtimes")
    types = cfg["available_node_types"].values()
    if not all(t["node_config"].get("SecurityGroupIds") for t in types):
        out.append("no SecurityGroupIds: Ray's own group, which EFS's mount target does not admit")
    if any("latest" in str(t["node_config"].get("ImageId")) for t in types):
        out.append("the AMI follows AWS's latest release: nodes started mid-sweep may differ")
    inits = " ".join(cfg.get("initialization_commands", []))
    if "nfs-common" not in inits:
        out.append("nfs-common assumed on the host")
    head_cmds = cfg.get("setup_commands", []) + cfg.get("head_setup_commands", [])
    if any("torch==" in c and "whl/cpu" not in c for c in head_cmds):
        out.append("the CPU head installs CUDA torch")
    installs = [i for i, c in enumerate(head_cmds) if "pip install" in c and " -e " in c]
    chowns = [i for i, c in enumerate(head_cmds) if "chown" in c]
    if installs and not (chowns and min(chowns) < min(installs)):
        out.append("pip install -e into a folder docker created as root")
    if "NODEKD_STORAGE=s3://" not in " ".join(head_cmds):
        out.append("results default to the EFS folder, unreachable after `ray down`")
    return out


def test_config_problems_none_today_all_before():
    assert config_problems(load(GPU_YAML)) == []
    assert config_problems(load(os.path.join(ROOT, "cluster", "gpu-image.yaml"))) == []
    assert len(config_problems(load(OLD_GPU_YAML))) == 7, config_problems(load(OLD_GPU_YAML))
