"""Type stubs for the part of the TensorRT 10 Python API that streamdet uses (mypy reads them via ``mypy_path``).

Signatures are those of ``tensorrt-stubs`` 10.13.0.35.1 (MIT, github.com/sync-dev-org/tensorrt-stubs,
generated from the TensorRT 10.13 bindings), trimmed to the members streamdet calls. That package
cannot serve mypy itself: its ``tensorrt/`` has no ``py.typed`` (mypy skips it, and with
``ignore_missing_imports`` every TensorRT type silently becomes ``Any``), forcing it in fails on
syntax errors in ``tensorrt_bindings/tensorrt.pyi`` (parameters named ``in``, a non-default
parameter after defaults) and hundreds of errors inside it, and its dependency on the ``tensorrt``
wheel needs NVIDIA's package index, so ``pip install -e '.[dev]'`` could not list it.

Corrected here, each marked ``# corrected:``:

* ``Dims`` is iterable and tuples/lists are accepted wherever a ``Dims`` is expected: the
  bindings define ``__iter__`` and ``py::implicitly_convertible<std::vector<int>, Dims>()``
  (TensorRT ``python/src/infer/pyFoundationalTypes.cpp``).
* ``build_serialized_network``, ``deserialize_cuda_engine`` and ``create_execution_context``
  return ``X | None``: their C++ counterparts return ``nullptr`` on failure, which the bindings
  pass on as ``None``.
* ``OnnxParser.get_error`` returns ``ParserError`` (the package leaves it untyped).

Add a member here when the code starts using it; mypy reports ``attr-defined`` until then.
"""

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, overload

from typing_extensions import Buffer

__version__: str

class _Enum:
    __members__: ClassVar[dict[str, Any]]
    def __init__(self, value: int) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    def __ne__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...
    def __index__(self) -> int: ...
    def __int__(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class DataType(_Enum):
    BF16: ClassVar[DataType]
    BOOL: ClassVar[DataType]
    E8M0: ClassVar[DataType]
    FLOAT: ClassVar[DataType]
    FP4: ClassVar[DataType]
    FP8: ClassVar[DataType]
    HALF: ClassVar[DataType]
    INT32: ClassVar[DataType]
    INT4: ClassVar[DataType]
    INT64: ClassVar[DataType]
    INT8: ClassVar[DataType]
    UINT8: ClassVar[DataType]
    @property
    def itemsize(self) -> int: ...

class TensorIOMode(_Enum):
    INPUT: ClassVar[TensorIOMode]
    NONE: ClassVar[TensorIOMode]
    OUTPUT: ClassVar[TensorIOMode]

class MemoryPoolType(_Enum):
    DLA_GLOBAL_DRAM: ClassVar[MemoryPoolType]
    DLA_LOCAL_DRAM: ClassVar[MemoryPoolType]
    DLA_MANAGED_SRAM: ClassVar[MemoryPoolType]
    TACTIC_DRAM: ClassVar[MemoryPoolType]
    TACTIC_SHARED_MEMORY: ClassVar[MemoryPoolType]
    WORKSPACE: ClassVar[MemoryPoolType]

class NetworkDefinitionCreationFlag(_Enum):
    EXPLICIT_BATCH: ClassVar[NetworkDefinitionCreationFlag]
    PREFER_AOT_PYTHON_PLUGINS: ClassVar[NetworkDefinitionCreationFlag]
    PREFER_JIT_PYTHON_PLUGINS: ClassVar[NetworkDefinitionCreationFlag]
    STRONGLY_TYPED: ClassVar[NetworkDefinitionCreationFlag]

class Dims:
    MAX_DIMS: ClassVar[int]
    @overload
    def __init__(self) -> None: ...
    @overload
    def __init__(self, shape: Sequence[int]) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[int]: ...  # corrected: the bindings define __iter__
    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[int, ...]: ...

_ShapeLike = Dims | Sequence[int]  # corrected: py::implicitly_convertible<std::vector<int>, Dims>

class ILogger:
    class Severity(_Enum):
        ERROR: ClassVar[ILogger.Severity]
        INFO: ClassVar[ILogger.Severity]
        INTERNAL_ERROR: ClassVar[ILogger.Severity]
        VERBOSE: ClassVar[ILogger.Severity]
        WARNING: ClassVar[ILogger.Severity]
    ERROR: ClassVar[ILogger.Severity]
    INFO: ClassVar[ILogger.Severity]
    INTERNAL_ERROR: ClassVar[ILogger.Severity]
    VERBOSE: ClassVar[ILogger.Severity]
    WARNING: ClassVar[ILogger.Severity]
    def __init__(self) -> None: ...
    def log(self, severity: ILogger.Severity, msg: str) -> None: ...

class Logger(ILogger):
    min_severity: ILogger.Severity
    def __init__(self, min_severity: ILogger.Severity = ...) -> None: ...

class IHostMemory:
    def __buffer__(self, flags: int, /) -> memoryview: ...
    @property
    def dtype(self) -> DataType: ...
    @property
    def nbytes(self) -> int: ...

class ITimingCache:
    def serialize(self) -> IHostMemory: ...

class IOptimizationProfile:
    def set_shape(self, input: str, min: _ShapeLike, opt: _ShapeLike, max: _ShapeLike) -> None: ...

class INetworkDefinition: ...

class IBuilderConfig:
    builder_optimization_level: int
    def add_optimization_profile(self, profile: IOptimizationProfile) -> int: ...
    def create_timing_cache(self, serialized_timing_cache: Buffer) -> ITimingCache: ...
    def get_timing_cache(self) -> ITimingCache: ...
    def set_memory_pool_limit(self, pool: MemoryPoolType, pool_size: int) -> None: ...
    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool: ...

class Builder:
    def __init__(self, logger: ILogger) -> None: ...
    # corrected: None when the build fails
    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> IHostMemory | None: ...
    def create_builder_config(self) -> IBuilderConfig: ...
    def create_network(self, flags: int = 0) -> INetworkDefinition: ...
    def create_optimization_profile(self) -> IOptimizationProfile: ...

class ParserError:
    def desc(self) -> str: ...
    def node(self) -> int: ...
    def node_name(self) -> str: ...
    def node_operator(self) -> str: ...

class OnnxParser:
    def __init__(self, network: INetworkDefinition, logger: ILogger) -> None: ...
    def get_error(self, index: int) -> ParserError: ...  # corrected: untyped in the package
    def parse_from_file(self, model: str) -> bool: ...
    @property
    def num_errors(self) -> int: ...

class IExecutionContext:
    def execute_async_v3(self, stream_handle: int) -> bool: ...
    def get_tensor_shape(self, name: str) -> Dims: ...
    def set_input_shape(self, name: str, shape: _ShapeLike) -> bool: ...
    def set_tensor_address(self, name: str, memory: int) -> bool: ...

class ICudaEngine:
    # corrected: None when the context cannot be created (GPU memory)
    def create_execution_context(self) -> IExecutionContext | None: ...
    def get_tensor_dtype(self, name: str) -> DataType: ...
    def get_tensor_mode(self, name: str) -> TensorIOMode: ...
    def get_tensor_name(self, index: int) -> str: ...
    @property
    def num_io_tensors(self) -> int: ...

class Runtime:
    def __init__(self, logger: ILogger) -> None: ...
    # corrected: None when the plan cannot be deserialized
    def deserialize_cuda_engine(self, serialized_engine: Buffer) -> ICudaEngine | None: ...
