import os

import pytest
import torch

from ragseek.defaults import shared_data_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def shared_data():
    """../shared/data (SciFact, GSM8K); tests that need it skip when the checkout has no shared/ beside it."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent (set RAGSEEK_DATA to a folder with scifact/ and gsm8k/)")
    return path
