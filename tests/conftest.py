"""Shared fixtures: fast deterministic CPU tests, and ../shared material that skips cleanly when absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# respect OMP_NUM_THREADS (parallel test runs on a busy box); default: up to 2 threads
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DFCOMPRESS_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED / "data"


@pytest.fixture(scope="module")
def single_thread():
    """Tests of many tiny tensors: a second intra-op thread gains nothing and spin-waits on a busy box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
