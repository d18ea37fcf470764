"""Faster `tl.associative_scan` and `tl.reduce` with a user combine function for Triton's interpreter, installed by
conftest.py under TRITON_INTERPRET=1.

The interpreter runs both one element at a time: for a (16, 8, 64) tile, 8,192 Python calls of the combine function.
kernels/triton_scan.py scans with its own combine functions, and its backward reverses tiles with `tl.flip`, which
Triton builds from `xor_sum` reductions (a user combine, `a ^ b`): those loops were most of the selective-scan and
fused-model tests' time on the CPU (the flips alone 80% of the fused model's). A combine function is elementwise (a
kernel cannot tell one lane from another), so calling it once per step along the axis, on whole slices, does each
element's operations in the same order and in the same dtypes: the same bits, at a few calls per tile.

Only the interpreter's emulation changes, never a kernel (on a GPU the compiled code runs), and
tests/test_triton_scan.py checks the bits against the interpreter's own loops. Where a Triton release lays its
interpreter out differently (no `generic_scan` / `generic_reduce`), nothing is replaced and the slow loops run.
"""
import numpy as np
import triton.language as tl

ELEMENTWISE = {}        # the interpreter's own loops that install() replaced, by name (for the test)


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def _data(value, like):
    """A combine function's result as a numpy array in the input's dtype (it may return a plain number)."""
    return np.asarray(value.handle.data if isinstance(value, tl.core.tensor) else value, dtype=like.dtype)


def generic_scan(self, input):
    data = [arg.handle.data for arg in input]
    out = [np.empty_like(d) for d in data]
    lead = (slice(None),) * (self.axis % data[0].ndim)

    def step(arrays, i):                        # slice i along the axis, the axis kept (of length 1)
        return tuple(self.to_tensor(a[lead + (slice(i, i + 1),)], arg.dtype) for a, arg in zip(arrays, input))

    for i in range(data[0].shape[len(lead)]):
        acc = step(data, i)
        if i > 0:
            acc = _as_tuple(self.combine_fn.fn(*step(out, i - 1), *acc))
        for o, a in zip(out, acc):
            o[lead + (slice(i, i + 1),)] = _data(a, o)
    return [self.to_tensor(o, arg.dtype) for o, arg in zip(out, input)]


def generic_reduce(self, input):
    original_axis = self.axis
    input, axis = self.unravel(input, self.axis)
    data = [arg.handle.data for arg in input]
    lead = (slice(None),) * axis

    def step(i):                                # slice i along the axis, the axis kept (of length 1)
        return tuple(self.to_tensor(d[lead + (slice(i, i + 1),)], arg.dtype) for d, arg in zip(data, input))

    acc = step(0)
    for i in range(1, data[0].shape[axis]):
        acc = _as_tuple(self.combine_fn.fn(*acc, *step(i)))
    ret = []
    for a, d, arg in zip(acc, data, input):
        out = _data(a, d)
        if not self.keep_dims:
            out = np.squeeze(out, axis)
            out = out.item() if original_axis is None else out
        elif original_axis is None:
            out = out.reshape((1,) * d.ndim)
        ret.append(self.to_tensor(out, arg.dtype))
    return ret


def install() -> bool:
    """Replace the interpreter's element-by-element loops; False (and nothing changed) where they are not found."""
    try:
        from triton.runtime.interpreter import ReduceOps, ScanOps
    except ImportError:
        return False
    targets = {"generic_scan": (ScanOps, generic_scan), "generic_reduce": (ReduceOps, generic_reduce)}
    if any(not callable(getattr(cls, name, None)) for name, (cls, _) in targets.items()):
        return False
    for name, (cls, fast) in targets.items():
        if name not in ELEMENTWISE:
            ELEMENTWISE[name] = getattr(cls, name)
            setattr(cls, name, fast)
    return True
