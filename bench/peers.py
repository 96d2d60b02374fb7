"""Peers that are engines of their own: ONNX Runtime (MLAS) and JAX (XLA).

Both are optional: each says what to install when it is missing, and the rest of the run
goes on without it.
"""
from __future__ import annotations

import multiprocessing
import os
import time

import numpy as np

from .impls import Impl, NumpyIm2col, ScipyOracle, Torch
from .timing import Timed

ORT_PIN = "onnx onnxruntime"
JAX_PIN = '"jax[cpu]"'
# 1-thread JAX must use about one core: more CPU time than this per second of wall time
# means XLA ran on more threads than it was given.
ONE_CORE_CPU_PER_WALL = 1.25


class OnnxRuntime(Impl):
    name = "ort"
    title = "ONNX Runtime Conv, CPU provider (peer)"
    timed = {"forward": "InferenceSession.run of a one-node ONNX Conv model (weights and bias "
                        "as initializers), intra_op_num_threads = threads, sequential, full "
                        "graph optimisation",
             "backward": ""}

    def __init__(self):
        self.ort = self.onnx = None

    def missing(self):
        try:
            import onnx
            import onnxruntime
        except ImportError:
            return f"ONNX Runtime is not installed (pip install {ORT_PIN})"
        self.ort, self.onnx = onnxruntime, onnx
        return None

    def skip(self, case, op):
        if op != "forward":
            return "ONNX Runtime runs inference only: no backward"
        if case.dtype != "float32":
            return "ONNX Runtime's CPU provider has no float64 Conv"
        return None

    def model(self, case) -> bytes:
        """A one-node Conv model for `case`, serialised."""
        onnx, helper = self.onnx, self.onnx.helper
        s = case.spec
        (pt, pb), (pl, pr) = s.padding
        elem = onnx.TensorProto.FLOAT
        node = helper.make_node("Conv", ["X", "W", "B"], ["Y"], strides=list(s.stride),
                                pads=[pt, pl, pb, pr], dilations=list(s.dilation),
                                group=s.groups, kernel_shape=[s.kh, s.kw])
        graph = helper.make_graph(
            [node], "conv",
            [helper.make_tensor_value_info("X", elem, list(case.x.shape))],
            [helper.make_tensor_value_info("Y", elem, list(s.output_shape))],
            initializer=[onnx.numpy_helper.from_array(case.weight, "W"),
                         onnx.numpy_helper.from_array(case.bias, "B")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        onnx.checker.check_model(model)
        return model.SerializeToString()

    def runner(self, case, op, threads=1):
        ort = self.ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle pool threads would otherwise spin for milliseconds after every run and take
        # the cores from the implementation timed next (measured: 2-thread calls timed
        # after ONNX Runtime's ran 2.5x slower). One Conv per run barely needs spinning.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(self.model(case), options,
                                       providers=["CPUExecutionProvider"])
        feed = {"X": case.x}
        return (lambda: session.run(None, feed)[0]), None


def _jax_worker(conn, cores: list) -> None:
    """Child process: JAX pinned to `cores` (XLA sizes its thread pool at import from the
    cores it may use), serving setup/call requests from the parent."""
    os.sched_setaffinity(0, cores)
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_x64", True)
    from jax import lax

    fn = args = None
    while True:
        try:
            msg = conn.recv()
        except EOFError:        # the parent is gone
            break
        try:
            if msg[0] == "quit":
                break
            if msg[0] == "setup":
                _, op, arrays, (stride, padding, dilation, groups) = msg

                def forward(x, w, b):
                    y = lax.conv_general_dilated(
                        x, w, window_strides=stride, padding=padding,
                        rhs_dilation=dilation, feature_group_count=groups,
                        dimension_numbers=("NCHW", "OIHW", "NCHW"),
                        precision=lax.Precision.HIGHEST)
                    return y + b[None, :, None, None]

                if op == "forward":
                    fn = jax.jit(forward)
                    args = tuple(jax.device_put(a) for a in arrays[:3])
                else:
                    def backward(x, w, b, gy):
                        return jax.vjp(forward, x, w, b)[1](gy)
                    fn = jax.jit(backward)
                    args = tuple(jax.device_put(a) for a in arrays)
                out = jax.block_until_ready(fn(*args))
                out = out if isinstance(out, tuple) else (out,)
                conn.send(("ok", tuple(np.asarray(o) for o in out)))
            elif msg[0] == "call":
                t0, c0 = time.perf_counter(), time.process_time()
                jax.block_until_ready(fn(*args))
                conn.send(("ok", (time.perf_counter() - t0, time.process_time() - c0)))
        except Exception as exc:  # reported to the parent, which marks the row an error
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Jax(Impl):
    name = "jax"
    title = "JAX lax.conv_general_dilated under jit (peer)"
    timed = {"forward": "jitted lax.conv_general_dilated + bias, to block_until_ready, in a "
                        "child process pinned to `threads` cores (XLA sizes its thread pool "
                        "at import); the child times each call",
             "backward": "jitted jax.vjp of the same function (grad input, weight, bias), "
                         "same child process"}

    def __init__(self):
        self.workers = {}
        self.usage = {}
        self.setup_outputs = None

    def missing(self):
        try:
            import jax  # noqa: F401  (the backend starts only in the child)
        except ImportError:
            return f"JAX is not installed (pip install {JAX_PIN})"
        if not hasattr(os, "sched_setaffinity"):
            return "needs os.sched_setaffinity (Linux) to give XLA a thread count"
        return None

    def _worker(self, threads: int):
        if threads not in self.workers:
            cores = sorted(os.sched_getaffinity(0))
            if threads > len(cores):
                raise RuntimeError(f"{threads} threads asked but only {len(cores)} cores")
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_jax_worker, args=(child, cores[:threads]), daemon=True)
            proc.start()
            self.workers[threads] = (proc, parent)
        return self.workers[threads][1]

    @staticmethod
    def _ask(conn, msg):
        conn.send(msg)
        status, value = conn.recv()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def runner(self, case, op, threads=1):
        conn = self._worker(threads)
        s = case.spec
        arrays = (case.x, case.weight, case.bias, case.grad_output)
        outputs = self._ask(conn, ("setup", op, arrays,
                                   (s.stride, s.padding, s.dilation, s.groups)))
        # The child keeps its outputs; the setup's copy stands for every call's.
        self.setup_outputs = outputs
        usage = self.usage[(case.layer.name, op, case.dtype, threads)] = [0.0, 0.0]

        def call():
            wall, cpu = self._ask(conn, ("call",))
            usage[0] += wall
            usage[1] += cpu
            return Timed(wall)
        return call, None

    def outputs(self, result):
        return self.setup_outputs

    def measured(self, case, op, threads) -> dict:
        wall, cpu = self.usage.get((case.layer.name, op, case.dtype, threads), (0, 0))
        if not wall:
            return {}
        info = {"cpu_per_wall": cpu / wall}
        if threads == 1 and cpu / wall > ONE_CORE_CPU_PER_WALL:
            info["warning"] = (f"1-thread JAX used {cpu / wall:.2f} CPU-seconds per second: "
                               f"more than one core")
        return info

    def close(self) -> None:
        for proc, conn in self.workers.values():
            try:
                conn.send(("quit",))
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self.workers.clear()


PEERS = {"torch": Torch, "ort": OnnxRuntime, "jax": Jax, "numpy": NumpyIm2col,
         "scipy": ScipyOracle}
