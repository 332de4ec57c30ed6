import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def cpu_parallel():
    """A one-process (TP=1, PP=1) CPU parallel state for the tests of one module, torn down after them."""
    import torch

    from nemo_customizer.distributed.parallel import destroy_parallel, initialize_parallel

    layout = initialize_parallel(tensor_parallel_size=1, pipeline_parallel_size=1, device=torch.device("cpu"), seed=0)
    yield layout
    destroy_parallel(layout)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny HF checkpoint with a byte-level tokenizer: one token per byte, no BOS, EOS appended to completions."""
    from _tiny import write_tiny_model_dir

    directory = tmp_path_factory.mktemp("model")
    write_tiny_model_dir(directory)
    return directory
