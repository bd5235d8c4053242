"""Deliberately bad kernels: the test of the ahead-of-time compile check (tests/test_compile_sm90.py)
proves the check flags each of them. Loaded only by that test, through ``--module``."""
import triton
import triton.language as tl

from fastssl.kernels.registry import register, variant


@triton.jit
def _spilling_kernel(a_ptr, out_ptr, BLOCK: tl.constexpr):
    # A 64 x 64 fp32 product on CUDA cores with 4 warps wants more than 255 registers a thread: it spills.
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, a, input_precision="ieee"))


@triton.jit
def _tiny_dot_kernel(a_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, a))  # 8 x 8: under tl.dot's 16 minimum


@triton.jit
def _fp32_fma_matmul_kernel(a_ptr, out_ptr, BLOCK: tl.constexpr):
    # bf16 inputs upcast to fp32 before an IEEE fp32 product: CUDA cores, not wgmma.
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :]).to(tl.float32)
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, a, input_precision="ieee"))


@triton.jit
def _shared_hog_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # Transposing a 256 x 256 fp32 tile goes through a 256 KB shared-memory buffer: over sm_90's 227 KB.
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs[:, None] * BLOCK + offs[None, :])
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], tl.trans(x) + x)


@triton.jit
def _dot_outside_loop_kernel(a_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # One bf16 wgmma before a loop of scalar adds: wgmma in the PTX, but the hot loop has none.
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
    acc = tl.dot(a, a)
    for i in range(n):
        acc += tl.load(a_ptr + i * BLOCK * BLOCK + offs[:, None] * BLOCK + offs[None, :]).to(tl.float32)
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], acc)


@triton.jit
def _forgotten_kernel(x_ptr):
    tl.store(x_ptr, 1.0)


register(_spilling_kernel, variants=[variant({"a_ptr": "*fp32", "out_ptr": "*fp32"})],
         configs=[triton.Config({"BLOCK": 64}, num_warps=4)])
register(_tiny_dot_kernel, variants=[variant({"a_ptr": "*fp16", "out_ptr": "*fp32"})],
         configs=[triton.Config({"BLOCK": 8}, num_warps=4)], uses_dot=True)
register(_fp32_fma_matmul_kernel, variants=[variant({"a_ptr": "*bf16", "out_ptr": "*fp32"})],
         configs=[triton.Config({"BLOCK": 16}, num_warps=4)], uses_dot=True)
register(_dot_outside_loop_kernel, variants=[variant({"a_ptr": "*bf16", "out_ptr": "*fp32", "n": "i32"})],
         configs=[triton.Config({"BLOCK": 64}, num_warps=4)], uses_dot=True)
register(_shared_hog_kernel, variants=[variant({"x_ptr": "*fp32", "out_ptr": "*fp32"})],
         configs=[triton.Config({"BLOCK": 256}, num_warps=32)])
