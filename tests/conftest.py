import os
import sys

import pytest
import torch

import recbole_reason  # noqa: F401  (applies the compatibility fixes)
from recbole_reason.config import Config

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TINY_CONFIG = os.path.join(TESTS_DIR, "tiny.yaml")
DATA_PATH = os.path.join(TESTS_DIR, "test_data")

# The suite runs in one pytest-xdist worker per core (pytest.ini): one intra-op thread each, so the workers do not
# oversubscribe the cores; without xdist, two threads.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


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


def tiny_config(model, config_dict):
    """Config on tests/tiny.yaml. Safe in module-scoped fixtures, which run before `_isolate`: Config would otherwise
    read pytest's own command line (e.g. --durations=10) as `--key=value` overrides."""
    argv, sys.argv = sys.argv, ["pytest"]
    try:
        return Config(model=model, config_file_list=[TINY_CONFIG], config_dict=config_dict)
    finally:
        sys.argv = argv


@pytest.fixture(scope="module")
def single_thread():
    """Tiny test tensors are overhead-bound: on the shared 2-core CPU one intra-op thread is much faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
