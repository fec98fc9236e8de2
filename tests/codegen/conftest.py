"""Code-generation tests: kernels go to a per-session cache directory, never the user's ~/.cache."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _kernel_cache_dir(tmp_path_factory):
    old = os.environ.get("LTMDSL_CACHE_DIR")
    os.environ["LTMDSL_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernel-cache"))
    yield
    if old is None:
        os.environ.pop("LTMDSL_CACHE_DIR", None)
    else:
        os.environ["LTMDSL_CACHE_DIR"] = old
