"""A faster `tl.associative_scan` for Triton's interpreter, installed by conftest.py under TRITON_INTERPRET=1.

The interpreter runs a scan with a user combine function (kernels/triton_scan.py's `_affine_combine` and
`_adjoint_combine`) one element at a time: for a (16, 8, 64) tile, 8,192 Python calls of the combine function, and
that loop was most of the selective-scan and fused-model tests' time on the CPU. The combine function is elementwise
(a kernel cannot tell one lane from another), so calling it once per step along the scan axis on whole slices does
each element's operations in the same order, in the same dtypes: the same bits, at a few calls per tile.

Only the interpreter's emulation changes, never a kernel: on a GPU the compiled scan runs. Where a Triton release
lays its interpreter out differently (no `ScanOps.generic_scan`), nothing is replaced and the slow loop runs.
"""
import numpy as np

ELEMENTWISE_SCAN = None          # the interpreter's own generic_scan, once install() has replaced it (for the test)


def install() -> bool:
    """Replace the interpreter's element-by-element scan; False (and nothing changed) where it is not found."""
    try:
        import triton.language as tl
        from triton.runtime.interpreter import ScanOps
    except ImportError:
        return False
    if not callable(getattr(ScanOps, "generic_scan", None)):
        return False

    def generic_scan(self, input):
        data = [arg.handle.data for arg in input]
        out = [np.empty_like(d) for d in data]
        lead = (slice(None),) * (self.axis % data[0].ndim)

        def step(arrays, i):                    # slice i along the axis, the axis kept (of length 1)
            return tuple(self.to_tensor(a[lead + (slice(i, i + 1),)], arg.dtype) for a, arg in zip(arrays, input))

        for i in range(data[0].shape[len(lead)]):
            acc = step(data, i)
            if i > 0:
                acc = self.combine_fn.fn(*step(out, i - 1), *acc)
                acc = acc if isinstance(acc, tuple) else (acc,)
            for o, a in zip(out, acc):
                o[lead + (slice(i, i + 1),)] = a.handle.data if isinstance(a, tl.core.tensor) else a
        return [self.to_tensor(o, arg.dtype) for o, arg in zip(out, input)]

    global ELEMENTWISE_SCAN
    if ELEMENTWISE_SCAN is None:
        ELEMENTWISE_SCAN = ScanOps.generic_scan
        ScanOps.generic_scan = generic_scan
    return True
