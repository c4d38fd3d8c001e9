import os
import sys

import pytest
import torch

import recbole_reason  # noqa: F401  (applies the compatibility fixes)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TINY_CONFIG = os.path.join(TESTS_DIR, "tiny.yaml")
DATA_PATH = os.path.join(TESTS_DIR, "test_data")

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """RecBole's Config reads `--key=value` from sys.argv, and every run writes log/ and saved/ into the cwd."""
    monkeypatch.setattr(sys, "argv", ["pytest"])
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def tiny(tmp_path):
    """config_dict for the tiny ml-100k-derived dataset (with item features), checkpoints in a tmp folder."""

    def make(**overrides):
        config = {"dataset": "tiny", "data_path": DATA_PATH, "checkpoint_dir": str(tmp_path / "saved")}
        config.update(overrides)
        return config

    return make
