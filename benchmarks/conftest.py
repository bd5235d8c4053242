"""pytest-benchmark glue: every ``test_case(benchmark, case)`` in a ``bench_*.py`` file is parametrized
over that file's ``cases(preset, device)``; the preset is ``quick`` unless ``--bench-preset full``."""
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-preset", default="quick", choices=["quick", "cpu", "targets", "full"], help="fastssl benchmark preset")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames and hasattr(metafunc.module, "cases"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        cases = metafunc.module.cases(metafunc.config.getoption("--bench-preset"), device)
        metafunc.parametrize("case", cases, ids=[c.name for c in cases])
