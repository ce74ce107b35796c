import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
