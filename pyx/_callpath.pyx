"""The checks every call makes before it reaches a kernel, in C: a layer of tiny calls
spends its time in them (in Python, a repeat key took half a microsecond, as long as the
seed layer's kernel). dilconv._validate imports them from here."""
cimport numpy as cnp

cnp.import_array()

import numpy as np

# The dtypes the kernels compute in.
KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
cdef object _FLOAT32 = KERNEL_DTYPES[0], _FLOAT64 = KERNEL_DTYPES[1]
cdef int _AS_IS_FLAGS = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED


cpdef bint is_plain(value):
    """Made of ints, strings and tuples of them only (hashable, no conversions to check)."""
    kind = type(value)
    if kind is int or kind is str:
        return True
    if kind is not tuple:
        return False
    for item in <tuple> value:
        kind = type(item)
        if kind is not int and kind is not str and not (kind is tuple and is_plain(item)):
            return False
    return True


cpdef bint as_is(arr, dtype):
    """An ndarray the kernels take as it is: `dtype`, C-contiguous and aligned."""
    if type(arr) is not np.ndarray:
        return False
    cdef cnp.ndarray a = <cnp.ndarray> arr
    cdef object own = <object> cnp.PyArray_DESCR(a)
    return ((own is dtype or own == dtype)
            and cnp.PyArray_FLAGS(a) & _AS_IS_FLAGS == _AS_IS_FLAGS)


def repeat_key(input, weight, bias, stride, padding, dilation, groups, padding_mode):
    """A hashable key of a conv2d call whose arrays `conv_call` would pass on as they are
    (ndarrays of float32 or float64, one dtype, C-contiguous, aligned), with zero padding
    and arguments of plain ints and strings; None for any other call. Calls with equal
    keys are valid or invalid together, with the same spec: a layer's repeated calls skip
    the checks once one has passed them (see dilconv._api)."""
    if type(input) is not np.ndarray or padding_mode != "zeros":
        return None
    dtype = <object> cnp.PyArray_DESCR(<cnp.ndarray> input)
    if dtype is not _FLOAT32 and dtype is not _FLOAT64 and dtype not in KERNEL_DTYPES:
        return None
    if (not as_is(input, dtype) or not as_is(weight, dtype)
            or (bias is not None and not as_is(bias, dtype))):
        return None
    args = (stride, padding, dilation, groups, padding_mode)
    if not is_plain(args):
        return None
    return (input.shape, weight.shape, None if bias is None else bias.shape, dtype, args)
