"""The backend switch and the installed package's shape."""
import os
import subprocess
import sys

import pytest
import torch

from fastssl.backend import use_triton


def test_auto_runs_cpu_tensors_on_the_torch_path(monkeypatch):
    monkeypatch.setenv("FASTSSL_BACKEND", "auto")
    assert use_triton(torch.zeros(2)) is False


def test_torch_backend_is_honoured(monkeypatch):
    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    assert use_triton(torch.zeros(2)) is False


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTSSL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTSSL_BACKEND='cuda' is not one of"):
        use_triton(torch.zeros(2))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTSSL_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        use_triton(torch.zeros(2))


def test_runs_on_host_only_for_eager_cpu_calls_with_nothing_to_differentiate(monkeypatch):
    """The host path's one decision: CPU tensors, no gradient to compute, a backend that is not triton; the
    environment is read at each call (its fast read sees monkeypatch's writes and removals)."""
    from fastssl.backend import environment, runs_on_host

    monkeypatch.delenv("FASTSSL_BACKEND", raising=False)
    x, w = torch.zeros(2), torch.zeros(2, requires_grad=True)
    assert environment("FASTSSL_BACKEND") is None and runs_on_host(x, None)
    assert not runs_on_host(x, w)
    with torch.no_grad():
        assert runs_on_host(x, w)
    monkeypatch.setenv("FASTSSL_BACKEND", "triton")
    assert environment("FASTSSL_BACKEND") == "triton" and not runs_on_host(x)
    monkeypatch.setenv("FASTSSL_BACKEND", " Torch ")
    assert runs_on_host(x) and use_triton(x) is False
    monkeypatch.setenv("FASTSSL_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTSSL_BACKEND='cuda'"):
        runs_on_host(x)


def test_triton_on_cpu_error_reaches_the_user_through_an_op(tmp_path):
    code = "import torch, fastssl; fastssl.cfg_combine(torch.ones(2, 2), torch.ones(2, 2), 1.0)"
    env = {**os.environ, "FASTSSL_BACKEND": "triton", "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 1 and "RuntimeError: FASTSSL_BACKEND=triton with CPU tensors" in run.stderr


def test_top_level_kernels_module_is_not_installed(tmp_path):
    """Hugging Face's ``kernels`` owns that name: our kernels install only as ``fastssl.kernels``."""
    code = ("import os, fastssl.kernels.registry\n"
            "try:\n    import kernels\nexcept ImportError:\n    print('absent')\n"
            "else:\n    print('ours' if os.path.exists(os.path.join(os.path.dirname(kernels.__file__), 'registry.py')) else 'other')")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.stdout.strip() in ("absent", "other"), run.stdout + run.stderr


def test_a_launch_autotunes_through_tritons_autotuner_over_the_offered_configs():
    """On a GPU a kernel chooses among several configs; under the interpreter :func:`registry.autotune`
    keeps one, so the slice tests never reach Triton's pruning and timing. Here Triton's own autotuner
    (a stand-in timer in place of CUDA events) prunes through the registry's filter and picks the fastest,
    for a :func:`registry.launch` (every argument by keyword: Triton's ``named_args`` is then empty)."""
    import triton
    import triton.language as tl

    from fastssl.kernels import registry

    @triton.jit
    def double(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (16, 32, 64)]
    keep = lambda config, dtype, arch: dtype == torch.float32 and config.kwargs["BLOCK"] != 32
    timings = iter([3.0, 1.0])  # BLOCK 16, then 64: the offered configs in order
    timed = []

    def timer(kernel_call, quantiles=None, **_):
        kernel_call()
        timed.append(1)
        t = next(timings)
        return [t, t, t] if quantiles else t
    kernel = triton.autotune(configs, key=["n"], do_bench=timer,
                             prune_configs_by={"early_config_prune": registry._offered_to_launch(keep)})(double)
    x = torch.arange(100, dtype=torch.float32)
    out = torch.empty_like(x)
    registry.launch(kernel, lambda meta: (triton.cdiv(100, meta["BLOCK"]),), x_ptr=x, out_ptr=out, n=100)
    assert len(timed) == 2 and kernel.best_config.kwargs["BLOCK"] == 64
    assert torch.equal(out, 2 * x)
