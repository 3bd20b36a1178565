"""GPU tests carry the `cuda` marker and are skipped without a CUDA device; every other test sees no GPU.

PEFT's CPU merge is the reference the suite checks bytes against, and CPU and CUDA can differ by a few ulps on
some small shapes (measured on an H100: README, "Correctness against PEFT"), so on a GPU machine `--device auto`
must not pick the GPU under a test that did not ask for it.
"""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_gpu_unless_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
