"""Every ``>>>`` example in the installed package runs and prints what its docstring says."""
import doctest
import importlib
import pkgutil

import pytest

import fastssl


def all_modules():
    return sorted(m.name for m in pkgutil.walk_packages(fastssl.__path__, "fastssl.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", all_modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
