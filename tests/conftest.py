import os

import pytest

# Two threads per test process: the suite is sized for 2-core machines.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Llama + BPE tokenizer with a chat template, saved as a normal HF folder."""
    from r2ec.testing import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from r2ec.config import ModelConfig
    from r2ec.model import DualHeadModel

    return DualHeadModel.from_config(ModelConfig(name_or_path=str(tiny_model_dir)))
