"""The cluster path, on this machine: Ray's own fake multi-node autoscaling cluster with logical
GPUs, cluster/gpu.yaml through Ray's own config validation, the command line that Ray's own
`ray submit` builds, and the driver's connection and GPU-placement rules."""
import copy
import json
import os
import shlex
import subprocess
import sys
import tomllib

import pytest
import yaml

from nodekd_ray import sweep as S
from nodekd_ray.devices import LOGICAL_GPUS_ENV, placement_device
from nodekd_ray.errors import ConfigError
from test_orchestration import SUBSET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)   # the environment's `ray` command
RAY_PIN = "2.60.0"

# Ray's fake multi-node provider (RAY_FAKE_CLUSTER=1): worker nodes are extra raylets on this
# machine, launched by the real autoscaler when demand asks for them. The wheel lacks the
# example.yaml that ray.cluster_utils.AutoscalingCluster reads, so the base config is here.
FAKE_BASE = {
    "cluster_name": "fake_multinode", "max_workers": 2,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5,
    "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [],
}


@pytest.fixture
def gpu_cluster(monkeypatch):
    """A head with 1 CPU and no GPU, and a worker type with 1 logical GPU that starts at 0 nodes."""
    from ray.cluster_utils import AutoscalingCluster

    class Cluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **kw):
            cfg = copy.deepcopy(FAKE_BASE)
            cfg["available_node_types"] = dict(worker_node_types)
            cfg["available_node_types"]["ray.head.default"] = {"resources": head_resources, "node_config": {},
                                                               "max_workers": 0}
            return cfg

    monkeypatch.setenv("PATH", BIN + os.pathsep + os.environ["PATH"])
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = Cluster(head_resources={"CPU": 1},
                      worker_node_types={"gpu_worker": {"resources": {"CPU": 1, "GPU": 1,
                                                                      "object_store_memory": 200 * 2**20},
                                                        "node_config": {}, "min_workers": 0, "max_workers": 2}})
    cluster.start()
    try:
        yield
    finally:
        cluster.shutdown()


@pytest.mark.serial   # its cluster ends with `ray stop --force`: every Ray instance on this machine
def test_sweep_on_a_simulated_autoscaling_gpu_cluster(gpu_cluster, tmp_path):
    """figure1 on digits through the sweep script's own entry point, with no --address: it must
    find and join the running cluster, ask for a GPU per job although no GPU node is up, get GPU
    workers started by the autoscaler, and every trial, logits and attack job must hold a GPU.
    (On the code before this change every job asked for 0 GPUs here and ran on the head.)"""
    store = tmp_path / "store"
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{LOGICAL_GPUS_ENV: "1"})
    env.pop("NODEKD_FAULTS", None)
    cmd = [sys.executable, os.path.join(ROOT, "sweeps", "figure1.py"), "--dataset", "digits", "--smoke-test",
           "--teachers", "resnet20", "--temperatures", "10", "--horizons", "1", "--baseline-horizons", "1",
           "--epochs", "1", "--attack-images", "16", *SUBSET, "--storage", str(store)]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "joined the Ray cluster at" in out and "0 GPUs" in out               # found, joined, no GPU yet
    assert "asks for 1 CPU and 1 GPU; no GPU node is up yet" in out
    st = S.Storage(str(store))
    recs = {x["key"]: x for x in st.records()}
    assert set(recs) == {"teacher-digits-resnet20-s0", "node-digits-t1-s0", "kd-digits-t1-resnet20-T10-lam0.9-s0"}
    for key, rec in recs.items():   # each trial held one (logical) GPU of a worker node, computed on the CPU
        assert rec["status"] == "done" and len(rec["held_gpus"]) == 1 and rec["device"] == "cpu", (key, rec)
    side = json.loads(st.read_bytes(st.logits("teacher-digits-resnet20-s0", "paper", "json")))
    assert len(side["held_gpus"]) == 1 and side["device"] == "cpu"
    rows = S.read_attacks(st).to_pylist()
    assert len(rows) == 3 * 2 * 6                                               # 3 models x 2 attacks x 6 eps
    assert len({(x["model_key"], x["attack"], x["eps_255"]) for x in rows}) == len(rows)
    assert all(x["held_gpus"] != "" and x["device"] == "cpu" for x in rows)


def test_a_job_holding_a_gpu_it_cannot_use_fails_in_one_line(monkeypatch, tmp_path, synthetic):
    monkeypatch.delenv(LOGICAL_GPUS_ENV, raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert placement_device([]) == "cpu"
    with pytest.raises(ConfigError) as e:
        placement_device(["0"])
    assert str(e.value).startswith("device: this job holds GPU ['0'] but torch") and "\n" not in str(e.value)
    # through a training job: the record says why, and nothing trains on the CPU instead
    st = S.Storage(str(tmp_path))
    job = S.TeacherJob("synthetic", "resnet20")
    with pytest.raises(ConfigError):
        S.run_training(job, S.Settings(teacher={"epochs": 1}), st, synthetic, held=["0"])
    rec = st.read_record(job.key)
    assert rec["status"] == "failed" and rec["held_gpus"] == ["0"] and rec["error"].startswith("device:")
    assert not st.done(job)
    monkeypatch.setenv(LOGICAL_GPUS_ENV, "1")   # the test switch: keep the request, compute on the CPU
    assert placement_device(["0"]) == "cpu"


def test_connect_never_falls_back_to_a_local_instance(monkeypatch):
    import ray

    from nodekd_ray.orchestration import cluster as driver

    calls, real_lookup = [], driver.running_cluster

    def fake_init(**kw):
        calls.append(kw)
        raise ConnectionError("Could not connect to GCS at 10.1.2.3:6379\nmore detail")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(driver, "_unreachable", lambda target: None)   # as if its GCS port answered
    for address, found in (("10.1.2.3:6379", None), (None, "10.1.2.3:6379")):
        calls.clear()
        monkeypatch.setattr(driver, "running_cluster", lambda: found)
        with pytest.raises(ConfigError) as e:
            driver.connect(address, log=lambda *a: None)
        assert str(e.value).startswith("address: cannot join the Ray cluster at 10.1.2.3:6379: Could not connect")
        assert len(calls) == 1 and calls[0]["address"] == (address or "auto")   # no second, local ray.init
    monkeypatch.setenv("RAY_ADDRESS", "10.9.9.9:6379")
    assert real_lookup() == "10.9.9.9:6379"


def test_address_local_starts_its_own_instance_beside_a_ray_start_address_file(tmp_path):
    """`--address local` (what the tests and a user beside a cluster pass) starts a local instance even
    when /tmp/ray/ray_current_cluster names a cluster, live or left behind by a killed `ray start`.
    Given address=None, ray.init joins that cluster and refuses num_cpus: a CI machine that had run the
    simulated cluster before failed 12 sweeps this way ("When connecting to an existing cluster,
    num_cpus and num_gpus must not be provided")."""
    import tempfile

    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")   # short: Ray's socket paths live under it
    try:
        os.makedirs(os.path.join(tmp, "ray"))
        with open(os.path.join(tmp, "ray", "ray_current_cluster"), "w") as f:
            f.write("192.0.2.2:6379")   # TEST-NET: nothing answers there
        env = dict(os.environ, RAY_TMPDIR=tmp)
        env.pop("RAY_ADDRESS", None)
        code = ("from nodekd_ray.orchestration.cluster import connect, running_cluster\n"
                "print('found', running_cluster())\n"
                "print('joined', connect('local', num_cpus=1))\n")
        r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=180)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-3000:]
        assert "found 192.0.2.2:6379" in out                       # the file is what Ray reads
        assert "started a local Ray instance: 1 node(s), 1 CPUs" in out and "joined False" in out, out[-3000:]
        assert "Connecting to existing Ray cluster" not in out
    finally:
        subprocess.run(["rm", "-rf", tmp])


def test_a_cluster_address_where_nothing_answers_is_refused_in_seconds(monkeypatch):
    """A stale /tmp/ray/ray_current_cluster (its `ray start` killed, not stopped) or a wrong --address:
    ray.init waits on a GCS that is gone for more than 10 minutes; the driver's probe refuses it at once."""
    import socket

    from nodekd_ray.orchestration import cluster as driver

    with socket.socket() as s:   # a port of this machine that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"127.0.0.1:{port}"
    assert driver._unreachable(dead).startswith("nothing answers there (Connection refused")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert driver._unreachable(f"127.0.0.1:{s.getsockname()[1]}") is None
    assert driver._unreachable("auto") is None                      # not host:port: Ray's to resolve
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("ray.init was called"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for address, found, names in ((None, dead, "ray_current_cluster, which a `ray start`"),
                                  (dead, None, "is it running? --address local")):
        monkeypatch.setattr(driver, "running_cluster", lambda: found)
        with pytest.raises(ConfigError) as e:
            driver.connect(address, log=lambda *a: None)
        msg = str(e.value)
        assert msg.startswith(f"address: cannot join the Ray cluster at {dead}: nothing answers there") and names in msg
        assert "\n" not in msg


def test_gpu_requests_default_to_one_on_a_cluster():
    from nodekd_ray.orchestration import Resources

    assert Resources().request(on_cluster=True, local_gpus=0) == {"cpu": 1.0, "gpu": 1.0}
    assert Resources().request(on_cluster=False, local_gpus=0)["gpu"] == 0
    assert Resources().request(on_cluster=False, local_gpus=1)["gpu"] == 1
    assert Resources(gpus_per_trial=0).request(on_cluster=True)["gpu"] == 0
    with pytest.raises(ConfigError):
        Resources(gpus_per_trial=float("inf")).validate()


# ----------------------------------------------------------------------------- cluster/gpu.yaml


def test_gpu_yaml_passes_rays_validation_and_pins_the_environment(monkeypatch):
    from ray.autoscaler._private.util import hash_runtime_conf, prepare_config, validate_config

    cfg = yaml.safe_load(open(os.path.join(ROOT, "cluster", "gpu.yaml")))
    validate_config(prepare_config(copy.deepcopy(cfg)))
    # one Ray version: the project's pin, the one installed here, the docker images' tags
    import ray

    deps = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    assert f"ray[tune]=={RAY_PIN}" in deps["dependencies"] and ray.__version__ == RAY_PIN
    assert f"ray[default,tune]=={RAY_PIN}" in deps["optional-dependencies"]["cluster"]
    assert cfg["docker"]["head_image"].startswith(f"rayproject/ray:{RAY_PIN}-py312")
    assert cfg["docker"]["worker_image"] == f"rayproject/ray:{RAY_PIN}-py312-gpu"
    assert "boto3" in " ".join(deps["optional-dependencies"]["cluster"])
    for part in ("head_setup_commands", "worker_setup_commands"):   # the pair, then the package, on each type
        setup = " ".join(cfg[part])
        assert '"[cluster,s3]"' in setup and "torch==2.15.0 torchvision==0.29.2" in setup
    # explicit resources on every node type; the GPU type declares its GPU; workers get a profile
    types = cfg["available_node_types"]
    assert all({"CPU", "GPU", "memory"} <= set(t["resources"]) for t in types.values())
    assert types["gpu_worker"]["resources"]["GPU"] == 1 and types["head"]["resources"]["GPU"] == 0
    assert types["gpu_worker"]["node_config"]["IamInstanceProfile"] == {"Name": "ray-autoscaler-v1"}
    # one pinned AMI, a security group of the user's (EFS admits it), on every node type
    assert all(t["node_config"]["ImageId"] == "ami-REPLACE-ME" for t in types.values())
    assert all(t["node_config"]["SecurityGroupIds"] == ["sg-REPLACE-ME"] for t in types.values())
    # GPUs passed explicitly to the workers' containers
    assert cfg["docker"]["worker_run_options"] == ["--gpus all"]
    assert cfg["docker"]["disable_automatic_runtime_detection"] is True
    # `ray up` hashes every file under each local file_mounts path: none of them may hold .venv
    monkeypatch.chdir(ROOT)
    opened = []
    real_open = open

    def spy(path, *a, **kw):
        opened.append(os.path.abspath(str(path)))
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", spy)
    hash_runtime_conf(cfg["file_mounts"], None, {}, generate_file_mounts_contents_hash=True)
    monkeypatch.undo()
    assert opened and not any(f"{os.sep}.venv{os.sep}" in p or f"{os.sep}runs{os.sep}" in p for p in opened)
    assert all(os.path.exists(os.path.join(ROOT, p)) for p in cfg["file_mounts"].values())


# ----------------------------------------------------------------------------- ray submit's command line


@pytest.mark.parametrize("tmux", [False, True])
def test_ray_submit_keeps_a_storage_uri_intact(monkeypatch, tmp_path, tmux):
    """The README's form: `ray submit [--tmux] cluster/gpu.yaml sweeps/table2.py -- --storage "'URI'"`.
    Ray joins the script's arguments with spaces, unquoted; the inner quotes survive that. The
    command is then wrapped as Ray's own _exec (tmux) and SSH runner (login shell) wrap it, and run
    through bash with a `python` that prints the arguments it receives."""
    from click.testing import CliRunner
    from ray.autoscaler._private import command_runner, commands
    from ray.scripts import scripts

    uri = "s3://bucket/exp?endpoint_override=127.0.0.1:9000&scheme=http"
    got = {}

    class Runner:
        def run(self, cmd, **kw):
            got["cmd"] = cmd

    monkeypatch.setattr(scripts, "rsync", lambda *a, **k: None)
    monkeypatch.setattr(scripts, "exec_cluster", lambda config, *, cmd, tmux, **kw: commands._exec(
        type("U", (), {"cmd_runner": Runner()})(), cmd=cmd, tmux=tmux))
    args = (["--tmux"] if tmux else []) + ["cluster/gpu.yaml", "sweeps/table2.py", "--", "--storage", f"'{uri}'",
                                           "--resume"]
    r = CliRunner().invoke(scripts.submit, args)
    assert r.exit_code == 0, r.output
    remote = " ".join(command_runner._with_interactive(got["cmd"]))   # what ssh runs on the head
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                 f"open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    (fake / "python").chmod(0o755)
    (fake / "tmux").write_text("#!/bin/bash\n# tmux new -d bash -c CMD: run CMD in the foreground\nshift 2; exec \"$@\"\n")
    (fake / "tmux").chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text(f"export PATH={fake}:$PATH\n")   # a login shell resets PATH first
    subprocess.run(["bash", "-c", remote], env={"PATH": "/usr/bin:/bin", "HOME": str(home)}, timeout=60, check=True,
                   stdin=subprocess.DEVNULL, capture_output=True)
    argv = json.load(open(tmp_path / "argv.json"))
    assert argv == [str(home / "table2.py"), "--storage", uri, "--resume"]
    assert shlex.split(got["cmd"])  # a well-formed shell line


def test_cpus_per_trial_auto_takes_a_gpu_nodes_cpus_per_gpu(tmp_path):
    from nodekd_ray.orchestration import Resources
    from nodekd_ray.orchestration.cluster import gpu_node_cpus_per_gpu

    # live nodes: the fewest CPUs per GPU among nodes with GPUs; the CPU head does not count
    assert gpu_node_cpus_per_gpu([{"CPU": 8}, {"CPU": 8, "GPU": 1}, {"CPU": 48, "GPU": 4}]) == 8
    # no GPU node up yet: the autoscaler's node types, as `ray up` writes them to the head
    boot = tmp_path / "ray_bootstrap_config.yaml"
    cfg = yaml.safe_load(open(os.path.join(ROOT, "cluster", "gpu.yaml")))
    boot.write_text(yaml.safe_dump(cfg))
    assert gpu_node_cpus_per_gpu([{"CPU": 8}], bootstrap=str(boot)) == 8      # g5.2xlarge: 8 vCPU, 1 GPU
    assert gpu_node_cpus_per_gpu([{"CPU": 8}], bootstrap=str(tmp_path / "none.yaml")) is None
    auto = Resources()
    assert auto.request(on_cluster=True, cpus_per_gpu=8) == {"cpu": 8.0, "gpu": 1.0}
    assert Resources(gpus_per_trial=0.5).request(on_cluster=True, cpus_per_gpu=8) == {"cpu": 4.0, "gpu": 0.5}
    assert auto.request(on_cluster=True, cpus_per_gpu=None) == {"cpu": 1.0, "gpu": 1.0}   # nothing known
    assert auto.request(on_cluster=False, local_gpus=0, cpus_per_gpu=16) == {"cpu": 1.0, "gpu": 0.0}  # CPU trials
    assert Resources(cpus_per_trial=2).request(on_cluster=True, cpus_per_gpu=8)["cpu"] == 2   # given: kept
