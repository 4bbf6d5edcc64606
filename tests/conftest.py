from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import torch

from dode_lightning.gmm import GaussianMixture, digits_mixture

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def fixture_path(*parts: str) -> Path:
    """Path inside ../shared/fixtures; skips the test when the folder or file is absent (a user's clone)."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"fixture {path} not available")
    return path


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """One intra-op thread: on a shared 2-core machine torch's spinning thread pool makes the small einsums and
    tiny networks of these tests 10–100× slower under contention, and they are too small to gain from two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def digits() -> GaussianMixture:
    return digits_mixture()


def unit_noise(batch: int, shape: tuple[int, ...] = (1, 8, 8), seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def wait_for_pngs(process: subprocess.Popen, outdir: Path, count: int, timeout: float = 120) -> None:
    """Wait until a running sample.py has written `count` PNGs into `outdir` (to interrupt it mid-run)."""
    deadline = time.monotonic() + timeout
    while len(list(outdir.rglob("*.png"))) < count:
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)
