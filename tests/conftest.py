import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from tests import tiny


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def hf_opt_dir(tmp_path_factory):
    return tiny.save_hf_blip2(tmp_path_factory.mktemp("hf-opt"), "opt")


@pytest.fixture(scope="session")
def hf_t5_dir(tmp_path_factory):
    return tiny.save_hf_blip2(tmp_path_factory.mktemp("hf-t5"), "t5")
