"""Suite-wide settings: remote stores' shard cache goes to a temporary folder, never the user's ~/.cache."""

import os
import shutil
import tempfile

_CACHE = tempfile.mkdtemp(prefix="mimicdet-test-cache-")


def pytest_configure(config) -> None:
    # Set before any test module builds its subprocess environment from os.environ.
    os.environ["XDG_CACHE_HOME"] = _CACHE


def pytest_unconfigure(config) -> None:
    shutil.rmtree(_CACHE, ignore_errors=True)
