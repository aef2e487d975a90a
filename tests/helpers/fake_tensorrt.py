"""A stand-in for the ``tensorrt`` module, backed by ONNX Runtime on the CPU, for testing our TensorRT code here.

It implements only the calls ``engines.deploy.build_engine`` and ``engines.tensorrt_backend`` make
(TensorRT 10 names and signatures), with the checks real TensorRT does on them (strongly typed
network flag, a profile containing every input shape, named tensor addresses set before
``execute_async_v3``). The "plan" is a small JSON header plus the ONNX bytes; "executing" reads the
input from the raw address given to ``set_tensor_address`` (CPU tensors here), runs ONNX Runtime
and writes the outputs to their raw addresses. It proves the binding logic (names, shapes, buffer
addresses, batch padding and chunking, header checks, rebuilds), not TensorRT itself: nothing
here runs TensorRT or CUDA.
"""

from __future__ import annotations

import ctypes
import json
from enum import IntEnum
from typing import Any

import numpy as np
import onnx

__version__ = "10.99.0.fake"

PLAN_MAGIC = b"FAKEPLAN"


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, severity: int = 2) -> None:
        self.severity = severity


class NetworkDefinitionCreationFlag(IntEnum):
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class MemoryPoolType(IntEnum):
    WORKSPACE = 0


class TensorIOMode(IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    INT64 = 8


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT32: np.int32, DataType.INT64: np.int64}

# knobs the tests turn
FAIL_OP: str | None = None  # the parser rejects the first node of this op type
BUILD_RETURNS_NONE = False
calls: list[str] = []


class _Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.onnx_bytes = b""


class ParserError:
    def __init__(self, index: int, name: str, op: str, desc: str) -> None:
        self._index, self._name, self._op, self._desc = index, name, op, desc

    def node(self) -> int:
        return self._index

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._op

    def desc(self) -> str:
        return self._desc


class OnnxParser:
    def __init__(self, network: _Network, logger: Logger) -> None:
        self.network = network
        self.errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> ParserError:
        return self.errors[i]

    def parse_from_file(self, path: str) -> bool:
        data = open(path, "rb").read()
        model = onnx.load_from_string(data)
        for i, n in enumerate(model.graph.node):
            if n.op_type == FAIL_OP:
                self.errors.append(ParserError(i, n.name, n.op_type, f"unsupported operator {n.op_type}"))
                self.errors.append(ParserError(i + 1, "x", "y", "follow-up"))
                return False
        self.network.onnx_bytes = data
        return True


class _TimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data)

    def serialize(self) -> bytes:
        return self.data + b"+"


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}

    def set_shape(self, name: str, mn: Any, opt: Any, mx: Any) -> None:
        self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))


class _Config:
    def __init__(self) -> None:
        self.pool: dict[int, int] = {}
        self.builder_optimization_level = 3
        self.cache: _TimingCache | None = None
        self.profiles: list[_Profile] = []

    def set_memory_pool_limit(self, pool: int, size: int) -> None:
        self.pool[int(pool)] = size

    def create_timing_cache(self, data: bytes) -> _TimingCache:
        return _TimingCache(data)

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache:
        assert self.cache is not None
        return self.cache

    def add_optimization_profile(self, p: _Profile) -> int:
        self.profiles.append(p)
        return len(self.profiles) - 1


class Builder:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def create_network(self, flags: int = 0) -> _Network:
        return _Network(flags)

    def create_builder_config(self) -> _Config:
        return _Config()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config) -> bytes | None:
        calls.append("build")
        assert network.flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)), "not strongly typed"
        assert len(config.profiles) == 1
        if BUILD_RETURNS_NONE:
            return None
        meta = json.dumps({"profile": {k: list(map(list, v)) for k, v in config.profiles[0].shapes.items()}}).encode()
        return PLAN_MAGIC + len(meta).to_bytes(4, "little") + meta + network.onnx_bytes


class _Engine:
    def __init__(self, plan: bytes) -> None:
        import onnxruntime as ort

        n = int.from_bytes(plan[8:12], "little")
        self.profile = {k: tuple(tuple(x) for x in v) for k, v in json.loads(plan[12 : 12 + n])["profile"].items()}
        model = onnx.load_from_string(plan[12 + n :])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession(plan[12 + n :], sess_options=opts, providers=["CPUExecutionProvider"])
        inits = {i.name for i in model.graph.initializer}
        self.inputs = [i for i in model.graph.input if i.name not in inits]
        self.outputs = list(model.graph.output)
        self.names = [i.name for i in self.inputs] + [o.name for o in self.outputs]
        self.shape_cache: dict[Any, dict[str, tuple[int, ...]]] = {}

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name in {i.name for i in self.inputs} else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType.FLOAT

    def create_execution_context(self) -> _Context:
        return _Context(self)


class _Context:
    def __init__(self, engine: _Engine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: Any) -> bool:
        mn, _, mx = self.engine.profile[name]
        shape = tuple(int(s) for s in shape)
        if len(shape) != len(mn) or any(not a <= s <= b for a, s, b in zip(mn, shape, mx, strict=True)):
            return False
        self.shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        # TensorRT infers concrete output shapes from the input shapes; here ONNX Runtime runs once on zeros
        key = tuple(sorted(self.shapes.items()))
        if key not in self.engine.shape_cache:
            feeds = {i.name: np.zeros(self.shapes[i.name], np.float32) for i in self.engine.inputs}
            outs = self.engine.session.run([o.name for o in self.engine.outputs], feeds)
            self.engine.shape_cache[key] = {o.name: a.shape for o, a in zip(self.engine.outputs, outs, strict=True)}
        return tuple(self.engine.shape_cache[key][name])

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        calls.append("execute")
        feeds = {}
        for i in self.engine.inputs:
            shape = self.shapes[i.name]
            n = int(np.prod(shape))
            buf = (ctypes.c_float * n).from_address(self.addresses[i.name])
            feeds[i.name] = np.frombuffer(buf, dtype=np.float32).reshape(shape).copy()
        outs = self.engine.session.run([o.name for o in self.engine.outputs], feeds)
        for o, arr in zip(self.engine.outputs, outs, strict=True):
            a = np.ascontiguousarray(arr, dtype=np.float32)
            assert a.shape == self.get_tensor_shape(o.name)
            ctypes.memmove(self.addresses[o.name], a.ctypes.data, a.nbytes)
        return True


class Runtime:
    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, plan: bytes) -> _Engine | None:
        if not bytes(plan[:8]) == PLAN_MAGIC:
            return None
        return _Engine(bytes(plan))


def reset() -> None:
    """Undo the knobs between tests."""
    global FAIL_OP, BUILD_RETURNS_NONE
    FAIL_OP = None
    BUILD_RETURNS_NONE = False
    calls.clear()
