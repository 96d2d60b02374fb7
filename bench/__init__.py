"""Microbenchmarks of dilconv against its peers on real layers: `python -m bench --help`."""
import os

# OpenBLAS's idle threads busy-wait for 2^28 cycles (about 0.1 s) after every call, so the
# numpy peer's matmuls took both cores from the implementation timed after them (2-thread
# calls ran up to 2x slower). The shortest wait (2^4 cycles) keeps the peers from
# slowing each other. It takes effect only if set before numpy loads OpenBLAS, as it is
# with `python -m bench`.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
