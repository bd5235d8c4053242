"""A probe of the ahead-of-time compile's specialization (tests/test_compile_sm90.py): one row-copy kernel (8 fp16 a thread)
compiled twice, its row stride declared a multiple of 16 (``"i32:16"``, as a real launch with such a
stride is specialized) and plain. Only the first may vectorize its loads; the compile check must see
the difference, or it inspects code the GPU never runs. Loaded only by that test, through ``--module``."""
import triton
import triton.language as tl

from fastssl.kernels.registry import register, variant


@triton.jit
def _row_copy_kernel(x_ptr, out_ptr, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + row * stride + offs, tl.load(x_ptr + row * stride + offs))


register(_row_copy_kernel, configs=[triton.Config({"BLOCK": 1024}, num_warps=4)],
         variants=[variant({"x_ptr": "*fp16", "out_ptr": "*fp16", "stride": "i32:16"}),
                   variant({"x_ptr": "*fp16", "out_ptr": "*fp16", "stride": "i32"})])
