"""Shared fixtures: paths to ../shared data, and helpers that make reference models non-trivial."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WHISPER_TINY_EN = SHARED / "whisper-tiny.en"
WHISPER_ASSETS = SHARED / "whisper-assets"
JFK = WHISPER_ASSETS / "jfk.flac"


def need_shared(path: Path):
    """Skip (with the reason) when ../shared is absent, as in a user's clone of the project alone."""
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not found: ../shared data is only beside CI/dev checkouts")


def perturb_(model: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Re-draw every weight from N(0, std) and LayerNorm/RMSNorm gains around 1 ± 0.2.

    Std 0.02 models barely attend, which hides position and ordering bugs; these do not.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") or name.endswith("ln_q.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model.eval()


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| divided by max(1, max |ref|): absolute for unit-scale outputs, relative for large."""
    return ((out.double() - ref.double()).abs().max() / max(1.0, ref.double().abs().max().item())).item()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
