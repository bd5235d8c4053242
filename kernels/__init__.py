"""Raw Triton kernels and their launchers (installed as ``fastssl.kernels``).

Kernels know nothing of autograd or ``torch.library``; the wrappers in ``fastssl/`` know nothing of
block sizes. Every ``@triton.jit`` function here is declared in :mod:`fastssl.kernels.registry`, which
the ahead-of-time compile test (``tests/test_compile_sm90.py``) walks.
"""
