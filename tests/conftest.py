import os

import pytest

import d2ext  # noqa: F401  (registers the built-in datasets)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT
