"""pytest configuration for the doctests of the package (``--doctest-modules``; tests/ has its own conftest).

Every example may use ``steerlab`` without importing it, as the README does.
"""

import pytest

import steerlab


@pytest.fixture(autouse=True)
def _steerlab_in_doctests(doctest_namespace):
    doctest_namespace["steerlab"] = steerlab
