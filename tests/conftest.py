"""Shared fixtures: checkpoints written in the exact upstream layouts (see ckpt_migrate.synthetic)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from ckpt_migrate import synthetic

from . import upstream_flex  # noqa: F401 (attention="flex": upstream's own attention, for the tests)
from .builders import VOCAB  # noqa: F401 (the tests import it from here)

EARLY_STEP = 100  # of 1000: long window 2 blocks, short 1 block, so windows bite at 512 tokens


def write(tmp_dir, name: str, obj) -> str:
    path = os.path.join(str(tmp_dir), name)
    synthetic.save(obj, path)
    return path


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


@pytest.fixture(scope="session")
def small_v1_path(ckpt_dir):
    sd = synthetic.small_state_dict("v1", vocab=VOCAB, seed=1)
    return write(ckpt_dir, "small_v1/best_state_100.pt",
                 synthetic.upstream_checkpoint(sd, "small", step=EARLY_STEP, num_iterations=1000))


@pytest.fixture(scope="session")
def small_v2_path(ckpt_dir):
    sd = synthetic.small_state_dict("v2", vocab=VOCAB, seed=2)
    return write(ckpt_dir, "small_v2/best_state_100.pt",
                 synthetic.upstream_checkpoint(sd, "small", step=EARLY_STEP, num_iterations=1000))


@pytest.fixture(scope="session")
def medium_path(ckpt_dir):
    sd = synthetic.medium_state_dict(vocab=VOCAB, seed=3)
    return write(ckpt_dir, "medium/best_state_100.pt",
                 synthetic.upstream_checkpoint(sd, "medium", step=EARLY_STEP, num_iterations=1000))


@pytest.fixture(scope="session")
def python():
    return sys.executable


def pytest_configure(config):
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node SLURM cluster (slurmctld + slurmd + munge) for the session.

    In CI (CI=true) it must come up; elsewhere, a machine without root or the packages skips.
    """
    from .slurm_cluster import ClusterUnavailable, start, stop

    workdir = str(tmp_path_factory.mktemp("slurm"))
    try:
        env = start(workdir)
    except ClusterUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the SLURM tests must run in CI, but the cluster cannot start: {exc}")
        pytest.skip(f"no SLURM test cluster on this machine: {exc}")
    yield env
    stop(workdir)
