"""Joining Ray and asking it for resources: what each job requests (Resources: GPUs and CPUs per trial, retries),
the CPUs per GPU of the cluster's GPU nodes, finding a running cluster, and connecting (never falling back to a
local instance when a cluster was asked for)."""
from __future__ import annotations

import dataclasses
import os


from ..config_cli import opt
from ..devices import LOGICAL_GPUS_ENV
from ..errors import ConfigError
from ..faults import ENV as FAULTS_ENV

FORWARDED_ENV = (FAULTS_ENV, LOGICAL_GPUS_ENV)   # reach every Ray worker through runtime_env


@dataclasses.dataclass
class Resources:
    # the sweep scripts' "cluster and resources" options are generated from these fields (config_cli.py)
    cpus_per_trial: float | None = opt(None, "CPUs each trial, logits and attack job asks for; none (auto): a GPU "
                                             "node's CPUs per GPU for a job holding GPUs, e.g. 8 on a g5.2xlarge "
                                             "(Ray caps a job's threads at its CPUs), 1 for a CPU job")
    gpus_per_trial: float | None = opt(None, "GPUs each trial, logits and attack job asks for, may be fractional; "
                                             "none: 1 on a cluster (also before a GPU node is up: the autoscaler "
                                             "starts one), else 1 if this machine has a GPU; 0 runs on CPUs")
    max_failures: int = opt(2, "retries of a failed trial from its last checkpoint")
    attack_retries: int = opt(2, "retries of an attack task whose worker died")
    max_concurrent: int = opt(0, "cap on trials at once; 0: as many as the resources allow")

    def validate(self):
        if self.cpus_per_trial is not None and not 0 < self.cpus_per_trial < float("inf"):
            raise ConfigError("cpus_per_trial", f"must be > 0 and finite, got {self.cpus_per_trial}")
        if self.gpus_per_trial is not None and not 0 <= self.gpus_per_trial < float("inf"):
            raise ConfigError("gpus_per_trial", f"must be >= 0 and finite, got {self.gpus_per_trial}")
        for name in ("max_failures", "attack_retries", "max_concurrent"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        return self

    def request(self, on_cluster: bool, local_gpus: float = 0.0, cpus_per_gpu: float | None = None) -> dict:
        """What every GPU-worthy job (trials, logits and attack tasks) asks Ray for.

        On a cluster the default is 1 GPU whether or not a GPU node is up yet: an autoscaling
        cluster starts with a CPU head only, and the autoscaler launches GPU workers only for
        jobs that ask for GPUs. On a fresh local instance the default is 1 if this machine has a
        GPU, else 0. --gpus-per-trial 0 forces CPUs.

        CPUs (--cpus-per-trial, default auto): a job holding GPUs asks for its share of a GPU node's
        CPUs (``cpus_per_gpu``, from gpu_node_cpus_per_gpu): Ray caps a task's torch threads at the
        CPUs it holds, and one CPU left the other 7 of a g5.2xlarge idle. A CPU job asks for 1, so that
        trials run side by side on the cores.
        """
        gpus = self.gpus_per_trial
        if gpus is None:
            gpus = 1.0 if on_cluster or local_gpus > 0 else 0.0
        cpus = self.cpus_per_trial
        if cpus is None:
            cpus = max(1.0, float(int(gpus * cpus_per_gpu))) if gpus > 0 and cpus_per_gpu else 1.0
        return {"cpu": cpus, "gpu": gpus}


def gpu_node_cpus_per_gpu(nodes=None, bootstrap: str = "~/ray_bootstrap_config.yaml") -> float | None:
    """CPUs per GPU of the GPU nodes that jobs will run on: the fewest among the live nodes with GPUs,
    else among the GPU node types of the autoscaler's config (``ray up`` writes it to the head, where
    the sweep's driver runs), else None (no GPU node known: jobs ask for 1 CPU)."""
    if nodes is None:
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    ratios = [r["CPU"] / r["GPU"] for r in nodes if r.get("GPU", 0) > 0 and r.get("CPU", 0) > 0]
    if not ratios:
        path = os.path.expanduser(bootstrap)
        if os.path.exists(path):
            try:
                import yaml

                with open(path) as f:
                    types = (yaml.safe_load(f) or {}).get("available_node_types", {})
                ratios = [t["resources"]["CPU"] / t["resources"]["GPU"] for t in types.values()
                          if t.get("resources", {}).get("GPU", 0) > 0 and t["resources"].get("CPU", 0) > 0]
            except (OSError, ValueError, KeyError, TypeError, ImportError):
                ratios = []
    return min(ratios) if ratios else None


def running_cluster() -> str | None:
    """The address of a running Ray cluster that a driver started here should join: RAY_ADDRESS,
    else the latest ``ray start`` on this machine (as ray.init(address="auto") finds it); None if none."""
    from ray._private import services

    try:
        return services.get_ray_address_from_environment(None, None)
    except Exception:  # noqa: BLE001 - nothing to join
        return None


_JOINED = False   # whether this process's Ray connection is to a cluster (set by connect)
PROBE_TIMEOUT_S = 5.0


def _unreachable(target: str) -> str | None:
    """Why nothing answers at a cluster address (a TCP connect to its GCS port), or None when something
    does or the address is not host:port. ray.init waits for a GCS that is gone for minutes (more than 10
    for one named by a stale /tmp/ray/ray_current_cluster, measured), so this is asked first."""
    import socket

    host, sep, port = target.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"nothing answers there ({e.strerror or type(e).__name__})"
    return None


def connect(address: str | None = None, num_cpus: int | None = None, log=print) -> bool:
    """Joins the Ray cluster at ``address`` (or the running one found here) or, when there is none,
    starts a local instance; ``address="local"`` always starts a local one. Returns True when it
    joined a cluster. A cluster that was named or found but cannot be joined is a one-line
    ``address:`` error, never a silent local instance. Prints the cluster's resources."""
    import ray

    global _JOINED
    if ray.is_initialized():  # connected before (a second sweep in one process, a benchmark)
        return _JOINED
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kw = {"runtime_env": {"env_vars": env}} if env else {}
    target = None if address == "local" else (address or running_cluster())
    if target is None:   # "local", not None: given None, ray.init joins the cluster a `ray start` left in
        # /tmp/ray/ray_current_cluster (a stale one too) and refuses num_cpus there
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kw)
        log(f"started a local Ray instance: {_resources_line()}")
        _JOINED = False
        return False
    hint = "is it running? --address local starts a fresh local instance instead"
    if not address and not os.environ.get("RAY_ADDRESS"):
        from ray._private.utils import get_ray_address_file

        hint = (f"it is named in {get_ray_address_file(None)}, which a `ray start` on this machine wrote; if that "
                "cluster is gone, `ray stop` clears it, or --address local starts a fresh local instance")
    why = _unreachable(target)
    if why is None:
        try:  # a cluster found here is joined as "auto": only then does Ray 2.60 use the token `ray start` wrote
            ray.init(address=address or "auto", **kw)
        except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ValueError, gRPC errors
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if why is not None:
        raise ConfigError("address", f"cannot join the Ray cluster at {target}: {why} ({hint})")
    log(f"joined the Ray cluster at {target}: {_resources_line()}")
    _JOINED = True
    return True


def _resources_line() -> str:
    import ray

    total = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    mem = total.get("memory", 0) / 2**30
    return (f"{len(nodes)} node(s), {total.get('CPU', 0):g} CPUs, {total.get('GPU', 0):g} GPUs, "
            f"{mem:.0f} GiB memory")
