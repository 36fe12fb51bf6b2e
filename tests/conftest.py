import os
import uuid

import pytest

# `make test` runs the suite in two pytest-xdist workers on the 2-core machine (Makefile): one thread per
# worker then, for its own torch ops and, through OMP_NUM_THREADS, every process it starts (sweep drivers,
# their Ray workers, benchmark scripts); two threads per worker would oversubscribe the cores.
IN_XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if IN_XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402

torch.set_num_threads(1 if IN_XDIST_WORKER else 2)

try:   # before any test sets TRITON_INTERPRET=1 (tests/test_fused_norm.py, test_costs.py): triton fixes its own
    import triton  # noqa: F401, E402   library functions as interpreted or compiled when first imported
except ImportError:
    pass

from nodekd_ray.data import load_dataset  # noqa: E402
from nodekd_ray.models import NODEConfig  # noqa: E402

TINY_NODE = dict(width=16, stem_channels=8)


@pytest.fixture(scope="session")
def synthetic():
    """(train, test): 256 / 128 learnable random images."""
    return load_dataset("synthetic", synthetic_sizes=(256, 128))


@pytest.fixture
def tiny_node_cfg():
    return NODEConfig(**TINY_NODE)


CREDENTIALS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def s3():
    """A function returning a fresh s3:// URI (a new prefix in one bucket) on a local S3 server."""
    import boto3
    from moto import server as moto_server

    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="nodekd")

    def uri(bucket="nodekd"):
        return f"s3://{bucket}/exp-{uuid.uuid4().hex[:8]}?endpoint_override={host}:{port}&scheme=http&region=us-east-1"

    yield uri
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (a sweep script end to end, a benchmark script: 30 s to 3.5 min each under two workers) run first,
    so that under `pytest -n 2` (make test) neither worker is left with one of them at the end while the
    other idles. The order is deterministic, as xdist requires of every worker's collection."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
