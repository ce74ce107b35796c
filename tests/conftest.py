"""Shared setup of the test suite.

Markers (declared in pyproject.toml), skipped here where they cannot run:
- ``gpu``: needs a CUDA device and iddpm_ext._C built with CUDA (scripts/gpu_check.sh runs them);
- ``kernels``: needs the compiled kernels iddpm_ext._C (``make build``);
- ``slow``: the longest tests (about 5 s or more on 2 cores; ``-m "not slow"`` leaves them out);
  they run first.
Shared helpers live in tests/helpers/ (importable as ``helpers``: pyproject's pythonpath).
"""

import os

if "PYTEST_XDIST_WORKER" in os.environ:  # parallel workers: one thread each (2 cores, 2 workers)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)


def _skip_reasons() -> dict:
    from iddpm_ext import ops

    reasons = {}
    if not (torch.cuda.is_available() and ops.has_kernel("cuda")):
        reasons["gpu"] = "needs a CUDA device and iddpm_ext._C built with CUDA"
    if not ops.available():
        reasons["kernels"] = f"needs iddpm_ext._C: {ops.load_error()}"
    return reasons


def pytest_collection_modifyitems(config, items):
    reasons = _skip_reasons()
    for item in items:
        for marker, reason in reasons.items():
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
                break
    # The slow tests first (a stable sort: the order within each group is kept). With
    # pytest-xdist handing out a few tests at a time (make test: --dist loadgroup) the long ones
    # start early on both workers and the short ones fill in around them, instead of one
    # 30-second test running alone at the end while the other worker idles.
    items.sort(key=lambda item: "slow" not in item.keywords)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A test that sets torch's thread count (``--threads 1`` on a command line run in this
    process) does not leave it set for the tests after it."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _forget_the_logger():
    """iddpm_ext.logger's current and default loggers (the default one is made by the first
    logging call before any configure(), as the reference's) do not outlive a test."""
    yield
    from helpers.training import forget_logger

    forget_logger()


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """An FID Inception-v3 with random weights (BN statistics spread so that features differ
    between images), saved as a weights file the way users pass the real one."""
    from iddpm_ext.evaluation import InceptionV3

    torch.manual_seed(0)
    net = InceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.fill_(0.5)
    path = tmp_path_factory.mktemp("w") / "inception_random.pth"
    torch.save({k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    return str(path)
