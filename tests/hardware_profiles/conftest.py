"""Small models shared by the hardware_profiles tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def make_cnn():
    """Factory for a small ResNet-ish stem CNN whose width can be pruned."""
    from torch import nn

    def make(width: int = 32) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, 10),
        )

    return make
