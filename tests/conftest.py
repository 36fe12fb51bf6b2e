import pytest
import torch

torch.set_num_threads(2)

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
