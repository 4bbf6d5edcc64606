from __future__ import annotations

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


@pytest.fixture(scope="session")
def digits() -> GaussianMixture:
    return digits_mixture()


def unit_noise(batch: int, shape: tuple[int, ...] = (1, 8, 8), seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
