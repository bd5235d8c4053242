"""Every ``>>>`` example in the installed package runs and prints what its docstring says."""
import doctest
import importlib
import pkgutil

import pytest

import fastssl
import fastssl.benchmarks
import fastssl.kernels


def all_modules():
    """Every module of the installed package: ``fastssl.kernels`` and ``fastssl.benchmarks`` live in
    other folders of the repo, so they are walked on their own paths."""
    names = {"fastssl", "fastssl.kernels", "fastssl.benchmarks"}
    for package in (fastssl, fastssl.kernels, fastssl.benchmarks):
        names |= {m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")}
    return sorted(n for n in names if not n.endswith(("__main__", ".conftest")))


@pytest.mark.parametrize("name", all_modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
