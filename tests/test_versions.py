"""onecard/versions.py: release tuples that order as releases do, and a missing package read as None."""

from onecard.versions import installed_version, version_tuple


def test_release_tuples_order_like_releases():
    assert version_tuple("5.24.0") == version_tuple("5.24.0.dev0") == version_tuple("5.24.0+cu130") == (5, 24, 0)
    assert version_tuple("5.9.1") < version_tuple("5.21.0") < version_tuple("6.0.0")
    assert version_tuple("2.6.3.post1") == (2, 6, 3)


def test_installed_version_reads_metadata_and_none_when_absent():
    import pytest

    assert version_tuple(installed_version("pytest")) == version_tuple(pytest.__version__)
    assert installed_version("not-a-package-xyz") is None
