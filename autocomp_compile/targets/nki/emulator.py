"""A NumPy emulator for the subset of NKI 0.1 (`neuronxcc.nki`) that our kernels and simple LLM-written
kernels use, with Trainium-1 (NeuronCore-v2) hardware rules enforced.

The kernel source is the same text that neuronx-cc compiles: it does `import neuronxcc.nki.language as nl`
and `import neuronxcc.nki.isa as nisa`. `run_kernel` executes it with shim modules in `sys.modules`, so those
imports resolve to this file's `nl`/`nisa` objects. Every engine instruction is recorded (engine, size,
buffers read and written) for `cost_model.estimate`.

Rules (a kernel that breaks one raises `NkiRuleError` whose `rule` names it):
  partition-dim     an on-chip (SBUF/PSUM) tile's first dim is its partition dim, at most 128
  psum-tile-size    a PSUM tile holds at most 2 KiB per partition (512 fp32): one bank
  psum-banks        at most 8 PSUM banks (16 KiB per partition) are live at once
  sbuf-capacity     live SBUF tiles use at most 192 KiB per partition (trn1)
  matmul-operands   matmul operands must be in SBUF (not PSUM or HBM)
  matmul-shape      stationary at most 128x128, moving free size at most 512, same contraction (partition) size
  matmul-result     a matmul result goes to PSUM; it cannot be written into an SBUF tile directly
  hbm-operand       compute instructions read on-chip tiles only; HBM is reached with load/store (DMA)
  out-of-bounds     an unmasked access outside a tensor's shape
  partition-access  an on-chip tile's partition index varies only along the access's first axis, and its free
                    indices do not (moving data across partitions takes a TensorE transpose or a DMA)
  gpsimd-psum       GpSimd instructions cannot read or write PSUM (trn1)
  shape-mismatch    PSUM accumulation and nisa.tensor_tensor need operands of the same shape (tensor_tensor:
                    same partitions and elements per partition)
  reduce-axes       reductions run along the trailing free axes of a tile
  psum-operands     nisa.tensor_tensor cannot read both of its operands from PSUM
  affine-select-pred  nisa.affine_select's predicate is one comparison of affine expressions (not `a & b`, `a | b`,
                    `~a`, `a and b`: NKI refuses those; found in the kernel's source)
Semantics followed: a bare Python `range` in a kernel is a `sequential_range` (neuronx-cc replaces it);
`static_range` is unrolled at tracing (its index is a Python int). `mask=` on a compute instruction limits the
elements it computes: assigned to a tile, the result writes only those (a `mask=False` instruction writes nothing);
the other elements of the result are undefined (NaN here).
New buffers (`nl.ndarray`, load results, HBM outputs) start filled with NaN; bf16 values are rounded
through `ml_dtypes.bfloat16` whenever they are written.
"""
from __future__ import annotations

import ast
import builtins
import contextlib
import functools
import itertools
import sys
import types
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np

PMAX = 128  # partitions
PSUM_BANK_BYTES = 2048  # per partition: 512 fp32
PSUM_BANKS = 8
SBUF_BYTES_PER_PARTITION = 192 * 1024  # trn1 (NeuronCore-v2): 24 MiB / 128 partitions
MOVING_FMAX = 512
STATIONARY_FMAX = 128

bfloat16 = np.dtype(ml_dtypes.bfloat16)
float32 = np.dtype(np.float32)
float16 = np.dtype(np.float16)
int32 = np.dtype(np.int32)


class NkiRuleError(RuntimeError):
    """A kernel broke a Trainium hardware rule; `rule` is its short name (see the module docstring)."""

    def __init__(self, rule: str, message: str):
        super().__init__(f"NKI rule '{rule}' broken: {message}")
        self.rule = rule


class NkiUnsupported(NotImplementedError):
    """A part of NKI the emulator does not implement (see the README's list)."""


# ---------------------------------------------------------------- instruction trace


@dataclass
class Op:
    """One engine instruction as the cost model sees it."""

    engine: str  # "dma", "tensor", "vector", "scalar", "gpsimd"
    name: str
    partitions: int = 1
    free: int = 1  # elements per partition processed (moving free size for matmuls)
    bytes: int = 0  # DMA bytes
    chunk_bytes: int = 0  # DMA: contiguous bytes per descriptor
    fp32: bool = False
    reads: list[int] = field(default_factory=list)
    writes: list[int] = field(default_factory=list)
    barrier: int = 0  # sequential-loop epoch: an op waits for every op of earlier epochs


class Machine:
    """Per-run state: memory accounting, instruction trace, loop epochs."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.sbuf: dict[int, int] = {}
        self.psum: dict[int, int] = {}
        self.peak_sbuf = 0
        self.epoch = 0
        self._ids = itertools.count(1)

    def new_id(self) -> int:
        return next(self._ids)

    def record(self, op: Op) -> Op:
        op.barrier = self.epoch
        self.ops.append(op)
        return op

    def allocate(self, t: "Tensor") -> None:
        if t.buffer == "sbuf":
            per_part = _per_partition_bytes(t)
            self.sbuf[t.buf] = per_part
            live = builtins.sum(self.sbuf.values())
            self.peak_sbuf = builtins.max(self.peak_sbuf, live)
            if live > SBUF_BYTES_PER_PARTITION:
                raise NkiRuleError("sbuf-capacity", f"live SBUF tiles need {live} bytes per partition, more than the "
                                   f"{SBUF_BYTES_PER_PARTITION} (192 KiB) of a trn1 partition (last: {t.shape} {t.dtype})")
            weakref.finalize(t, self.sbuf.pop, t.buf, None)
        elif t.buffer == "psum":
            per_part = _per_partition_bytes(t)
            if per_part > PSUM_BANK_BYTES:
                raise NkiRuleError("psum-tile-size", f"PSUM tile {t.shape} {t.dtype} needs {per_part} bytes per partition; "
                                   "one PSUM tile fits one 2 KiB bank (512 fp32 per partition)")
            self.psum[t.buf] = 1
            if len(self.psum) > PSUM_BANKS:
                raise NkiRuleError("psum-banks", f"{len(self.psum)} PSUM tiles live at once; PSUM has {PSUM_BANKS} banks of 2 KiB")
            weakref.finalize(t, self.psum.pop, t.buf, None)


_MACHINE: Machine | None = None


def _m() -> Machine:
    if _MACHINE is None:
        raise RuntimeError("NKI emulator: kernel functions run only inside run_kernel()")
    return _MACHINE


def _per_partition_bytes(t: "Tensor") -> int:
    n = 1
    for d in t.shape[1:]:
        n *= d
    return n * t.dtype.itemsize


# ---------------------------------------------------------------- tensors and index grids

class _Buffer(str):
    pass


sbuf, psum, hbm, shared_hbm, private_hbm = (_Buffer(s) for s in ("sbuf", "psum", "hbm", "hbm", "hbm"))


class _VectorOps:
    """Python's arithmetic operators on tiles and accesses: elementwise work on the Vector Engine."""

    def __add__(self, o): return _binary(np.add, self, o)
    def __radd__(self, o): return _binary(np.add, o, self)
    def __sub__(self, o): return _binary(np.subtract, self, o)
    def __rsub__(self, o): return _binary(np.subtract, o, self)
    def __mul__(self, o): return _binary(np.multiply, self, o)
    def __rmul__(self, o): return _binary(np.multiply, o, self)
    def __truediv__(self, o): return _binary(np.divide, self, o)


class Tensor(_VectorOps):
    """An HBM tensor or an on-chip tile. Indexing gives an `Access`; results of ops are new tiles."""

    def __init__(self, data: np.ndarray, buffer: str, name: str = ""):
        self.data = data
        self.buffer = str(buffer)
        self.name = name
        self.buf = _m().new_id()
        self.producer: Op | None = None
        self.read_count = 0
        self.load_mask: np.ndarray | None = None
        if self.buffer != "hbm":
            if data.ndim == 0 or data.shape[0] > PMAX:
                raise NkiRuleError("partition-dim", f"{self.buffer.upper()} tile of shape {data.shape}: the first "
                                   f"(partition) dimension must be 1..{PMAX}")
            _m().allocate(self)

    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)

    def __getitem__(self, key: Any) -> "Access":
        return Access(self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        Access(self, key).write(value)

    def values(self) -> np.ndarray:
        return self.data

    def __iadd__(self, other: Any) -> "Tensor":
        if not _accumulate_in_psum(self, other):
            self[...] = _binary(np.add, self, other)
        return self

    def __neg__(self): return _binary(np.multiply, self, -1.0)

    def broadcast_to(self, shape: tuple[int, ...]) -> "Tensor":
        return _unary_result(np.broadcast_to(_f32(self), shape), _dtype_of(self), [self], "vector", "broadcast")


def _is_grid(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.kind in "iu"


class Access(_VectorOps):
    """`tensor[key]`: an index expression not yet read or written (masks apply when it is)."""

    def __init__(self, tensor: Tensor, key: Any):
        self.tensor = tensor
        self.key = key if isinstance(key, tuple) else (key,)
        self._index, self.shape = self._resolve()

    dtype = property(lambda self: self.tensor.dtype)

    def _resolve(self) -> tuple[tuple, tuple[int, ...]]:
        self._fast: tuple | None = None
        shape = self.tensor.shape
        key = list(self.key)
        if any(k is Ellipsis for k in key):
            i = key.index(Ellipsis)
            key[i : i + 1] = [slice(None)] * (len(shape) - len(key) + 1)
        key += [slice(None)] * (len(shape) - len(key))
        if len(key) > len(shape):
            raise NkiRuleError("out-of-bounds", f"{len(key)} indices for a {len(shape)}-d tensor {shape}")
        grids = [k for k in key if _is_grid(k)]
        if grids:
            if any(isinstance(k, slice) for k in key):
                raise NkiUnsupported("mixing slices and index grids (nl.arange / nl.mgrid) in one access")
            idx = tuple(np.asarray(k) if _is_grid(k) else np.asarray(int(k)) for k in key)
            out_shape = tuple(np.broadcast_shapes(*(k.shape for k in idx)))
            if self.tensor.buffer != "hbm":
                _check_partition_access(idx, out_shape, self.tensor)
            self._fast = _affine_view(idx, out_shape, shape)
            return idx, out_shape
        idx, out_shape = [], []
        for d, (k, n) in enumerate(zip(key, shape)):
            if isinstance(k, slice):
                start, stop, step = k.start or 0, n if k.stop is None else k.stop, k.step or 1
                if start < 0 or stop > n or start > stop:
                    raise NkiRuleError("out-of-bounds", f"slice {start}:{stop} of dim {d} (size {n}) of {shape}")
                idx.append(slice(start, stop, step))
                out_shape.append(len(range(start, stop, step)))
            else:
                k = int(k)
                if not 0 <= k < n:
                    raise NkiRuleError("out-of-bounds", f"index {k} of dim {d} (size {n}) of {shape}")
                idx.append(k)
        if self.tensor.buffer != "hbm" and not isinstance(idx[0], slice) and out_shape and out_shape[0] > 1:
            raise NkiRuleError("partition-access", f"an integer partition index on {self.tensor.buffer.upper()} tile "
                               f"{shape} puts a free dim on the partitions of the result {tuple(out_shape)}")
        return tuple(idx), tuple(out_shape)

    def _checked(self, mask: Any) -> tuple[tuple, np.ndarray | None]:
        idx = self._index
        if not any(isinstance(k, np.ndarray) for k in idx):
            if mask is None:
                return idx, None
            grids = iter(np.ix_(*(np.arange(k.start, k.stop, k.step) for k in idx if isinstance(k, slice))))
            idx = tuple(next(grids) if isinstance(k, slice) else np.asarray(k) for k in idx)
        if mask is None:  # bounds of an unmasked grid: broadcasting adds no new index values
            for d, k in enumerate(idx):
                n = self.tensor.shape[d]
                if k.size and (k.min() < 0 or k.max() >= n):
                    bad = int(k.max() if k.max() >= n else k.min())
                    raise NkiRuleError("out-of-bounds", f"index {bad} of dim {d} (size {n}) of {self.tensor.shape} "
                                       "without a mask")
            return idx, None
        m = np.broadcast_to(np.asarray(mask, dtype=bool), self.shape)
        safe = []
        for d, k in enumerate(idx):
            n = self.tensor.shape[d]
            kb = np.broadcast_to(k, self.shape)
            live = kb[m]
            if live.size and (live.min() < 0 or live.max() >= n):
                raise NkiRuleError("out-of-bounds", f"index {int(live.max() if live.max() >= n else live.min())} of dim "
                                   f"{d} (size {n}) of {self.tensor.shape} where the mask is true")
            safe.append(np.where(m, kb, 0))
        return tuple(safe), m

    def _view(self) -> np.ndarray:
        """The accessed elements as a view in access order (grids that are plain shifted aranges)."""
        basic, perm, missing = self._fast  # type: ignore[misc]
        return np.expand_dims(self.tensor.data[basic].transpose(perm), missing)  # a view: writes go through

    def read(self, mask: Any = None) -> np.ndarray:
        if mask is None and self._fast is not None:
            return self._view()
        idx, m = self._checked(mask)
        out = self.tensor.data[idx]
        if m is not None:
            out = np.where(m, out, np.asarray(np.nan, out.dtype))
        return np.asarray(out)

    def write(self, value: Any, mask: Any = None) -> None:
        if self.tensor.buffer == "hbm":
            raise NkiUnsupported(f"assigning to HBM tensor {self.tensor.name or self.tensor.shape}: write HBM with "
                                 "nl.store (a DMA), as NKI requires")
        self._write(value, mask)

    def _write(self, value: Any, mask: Any = None) -> None:
        t = self.tensor
        if isinstance(value, Access) and getattr(value, "accumulated", False) and value.tensor is t:
            return  # `tile[idx] += matmul` already accumulated in place
        fresh = isinstance(value, Tensor) and value.producer is not None and value.read_count == 0
        if isinstance(value, Tensor) and value.producer is not None and value.producer.name.startswith("matmul") \
                and t.buffer != "psum":
            raise NkiRuleError("matmul-result", f"matmul result written into a {t.buffer.upper()} tile: TensorE writes "
                               "PSUM; copy it out (nl.copy / nisa.tensor_copy) first")
        if mask is None and fresh and value.load_mask is not None:
            mask = value.load_mask  # a masked load assigned to a tile writes only the elements it loaded
        vals = _values(value) if isinstance(value, (Tensor, Access)) else np.asarray(value, dtype=np.float32)
        vals = np.broadcast_to(vals, self.shape).astype(t.dtype)
        if mask is None and self._fast is not None:
            self._view()[...] = vals
            idx, m = (), None
        else:
            idx, m = self._checked(mask)
        if idx == ():
            pass
        elif m is None:
            t.data[idx] = vals
        else:
            t.data[tuple(k[m] for k in idx)] = vals[m]
        if t.buffer == "hbm":
            return
        if fresh:  # the instruction that produced `value` writes straight into this tile
            _check_gpsimd_psum(value.producer.engine, [t])
            value.producer.writes.append(t.buf)
            value.producer.reads.append(t.buf)  # a partial write keeps the rest of the tile
        elif isinstance(value, (Tensor, Access)):
            _record("vector", "copy", [value], t, free=_free(self.shape))

    def values(self) -> np.ndarray:
        return self.read()

    def __iadd__(self, other: Any) -> Any:
        """`psum[idx] += nc_matmul(...)` accumulates in PSUM on the Tensor Engine; otherwise a VectorE add."""
        t = self.tensor
        if t.buffer == "psum" and isinstance(other, Tensor) and other.producer is not None \
                and other.producer.name.startswith("matmul") and other.read_count == 0 \
                and (self._fast is not None or not any(isinstance(k, np.ndarray) for k in self._index)):
            _check_same_shape("PSUM accumulation", self.shape, other.shape)
            view = self._view() if self._fast is not None else t.data[self._index]
            view[...] = (view.astype(np.float32) + other.data).astype(t.dtype)
            other.producer.reads.append(t.buf)
            other.producer.writes.append(t.buf)
            other.read_count += 1
            self.accumulated = True
            return self
        return _binary(np.add, self, other)



def _affine_view(idx: tuple, out_shape: tuple[int, ...], shape: tuple[int, ...]) -> tuple | None:
    """Basic slices + axis permutation equal to the grid index `idx`, when each index array is a run of
    consecutive integers along one output axis (the common `base + nl.arange(n)` form); else None.
    Out-of-range runs return None so that the checked path reports them."""
    r = len(out_shape)
    basic: list[Any] = []
    axes: list[int] = []
    for d, k in enumerate(idx):
        k = k.reshape((1,) * (r - k.ndim) + k.shape)
        varying = [a for a in range(r) if k.shape[a] > 1]
        flat = k.reshape(-1)
        if not varying:
            v = int(flat[0])
            if not 0 <= v < shape[d]:
                return None
            basic.append(v)
            continue
        if len(varying) > 1 or varying[0] in axes:
            return None
        lo, hi = int(flat[0]), int(flat[-1])
        if hi - lo + 1 != flat.size or lo < 0 or hi >= shape[d] or (flat.size > 2 and not np.all(np.diff(flat) == 1)):
            return None
        basic.append(slice(lo, hi + 1))
        axes.append(varying[0])
    perm = tuple(int(i) for i in np.argsort(axes))
    return tuple(basic), perm, tuple(a for a in range(r) if a not in axes)


def _varying_axes(k: np.ndarray, rank: int) -> list[int]:
    k = k.reshape((1,) * (rank - k.ndim) + k.shape)
    return [a for a in range(rank) if k.shape[a] > 1]


def _check_partition_access(idx: tuple, out_shape: tuple[int, ...], t: "Tensor") -> None:
    """Each partition of an on-chip access comes from one partition of the tile: no transpose for free."""
    r = len(out_shape)
    if any(a != 0 for a in _varying_axes(idx[0], r)) or any(0 in _varying_axes(k, r) for k in idx[1:]):
        raise NkiRuleError("partition-access", f"index grids on {t.buffer.upper()} tile {t.shape} move elements across "
                           "partitions (the partition index must vary along the first axis only, the free indices "
                           "not along it); transpose with nisa.nc_transpose")


def _check_gpsimd_psum(engine: str, tensors: list["Tensor | None"]) -> None:
    if engine == "gpsimd" and any(t is not None and t.buffer == "psum" for t in tensors):
        raise NkiRuleError("gpsimd-psum", "a GpSimd instruction reads or writes PSUM, which GpSimd cannot access on "
                           "trn1; copy the tile to SBUF first (nl.copy / nisa.tensor_copy)")


def _check_same_shape(what: str, a: tuple[int, ...], b: tuple[int, ...]) -> None:
    if tuple(a) != tuple(b):
        raise NkiRuleError("shape-mismatch", f"{what} of shapes {tuple(a)} and {tuple(b)}: they must be equal")


def _values(x: Any) -> np.ndarray:
    if isinstance(x, Access):
        if x.tensor.buffer == "hbm":
            raise NkiRuleError("hbm-operand", f"compute instruction reads HBM tensor {x.tensor.name or x.tensor.shape}; "
                               "load it into SBUF with nl.load first")
        x.tensor.read_count += 1
        return x.read()
    if isinstance(x, Tensor):
        if x.buffer == "hbm":
            raise NkiRuleError("hbm-operand", f"compute instruction reads HBM tensor {x.name or x.shape}; "
                               "load it into SBUF with nl.load first")
        x.read_count += 1
        return x.data
    return np.asarray(x)


def _f32(x: Any) -> np.ndarray:
    return _values(x).astype(np.float32, copy=False)


def _tensor_of(x: Any) -> Tensor | None:
    return x.tensor if isinstance(x, Access) else x if isinstance(x, Tensor) else None


def _dtype_of(*xs: Any) -> np.dtype:
    dts = [(_tensor_of(x).dtype) for x in xs if _tensor_of(x) is not None]
    if not dts:
        return float32
    return float32 if any(d == float32 for d in dts) else dts[0]


def _free(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def _record(engine: str, name: str, inputs: list[Any], out: Tensor | None, free: int, partitions: int | None = None,
            **kw: Any) -> Op:
    _check_gpsimd_psum(engine, [_tensor_of(x) for x in inputs] + [out])
    reads = [t.buf for t in (_tensor_of(x) for x in inputs) if t is not None and t.buffer != "hbm"]
    op = Op(engine, name, partitions=partitions or (out.shape[0] if out is not None and out.ndim else 1), free=free,
            reads=reads, writes=[out.buf] if out is not None else [], **kw)
    _m().record(op)
    if out is not None:
        out.producer = op
    return op


def _unary_result(vals: np.ndarray, dtype: np.dtype, inputs: list[Any], engine: str, name: str,
                  buffer: str = "sbuf", free: int | None = None) -> Tensor:
    """A new tile from one instruction; `free`: elements per partition it processes (default: the result's)."""
    out = Tensor(np.ascontiguousarray(vals).astype(dtype), buffer)
    _record(engine, name, inputs, out, free=_free(out.shape) if free is None else free)
    return out


def _binary(fn: Callable, a: Any, b: Any, dtype: Any = None, engine: str = "vector") -> Tensor:
    va = _f32(a) if isinstance(a, (Tensor, Access)) else np.float32(a)
    vb = _f32(b) if isinstance(b, (Tensor, Access)) else np.float32(b)
    with np.errstate(all="ignore"):
        vals = fn(va, vb)
    return _unary_result(vals, np.dtype(dtype) if dtype is not None else _dtype_of(a, b), [a, b], engine, fn.__name__)


def _accumulate_in_psum(acc: Tensor, other: Any) -> bool:
    """`acc += x` with a fresh matmul result accumulates in PSUM on the Tensor Engine (no extra instruction)."""
    if not (acc.buffer == "psum" and isinstance(other, Tensor) and other.producer is not None
            and other.producer.name.startswith("matmul") and other.read_count == 0):
        return False
    _check_same_shape("PSUM accumulation", acc.shape, other.shape)
    acc.data[...] = (acc.data.astype(np.float32) + other.data).astype(acc.dtype)
    other.producer.reads.append(acc.buf)
    other.producer.writes.append(acc.buf)
    other.read_count += 1
    return True


# ---------------------------------------------------------------- nki.language (nl)


class _TileSize:
    pmax = PMAX
    psum_fmax = 512
    gemm_stationary_fmax = STATIONARY_FMAX
    gemm_moving_fmax = MOVING_FMAX


class _MGrid:
    def __getitem__(self, key: Any) -> Any:
        key = key if isinstance(key, tuple) else (key,)
        grids = np.ogrid[tuple(slice(k.start or 0, k.stop, k.step) for k in key)]
        return types.SimpleNamespace(**{n: g for n, g in zip("pxyz", grids)}) if len(grids) > 1 else grids[0]


def arange(*args: int) -> np.ndarray:
    return np.arange(*args, dtype=np.int64)


def par_dim(n: int) -> int:
    return n


def ds(start: int, size: int) -> slice:
    return slice(start, start + size)


def affine_range(*args: int) -> Iterator[int]:
    """Iterations without loop-carried dependencies: the scheduler may overlap them."""
    return iter(range(*args))


def static_range(*args: int) -> Iterator[int]:
    """Unrolled at tracing: its index is a Python int, the unrolled iterations overlap as straight-line code."""
    return iter(range(*args))


def sequential_range(*args: int) -> Iterator[int]:
    """Iterations that depend on each other: each starts after the previous one finished."""
    for i in range(*args):
        _m().epoch += 1
        yield i
    _m().epoch += 1


def _alloc(shape: Any, dtype: Any, buffer: str, fill: float, name: str = "") -> Tensor:
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    dt = np.dtype(dtype)
    return Tensor(np.full(shape, fill if dt.kind not in "iub" else 0, dtype=dt), buffer or sbuf, name)


def ndarray(shape: Any, dtype: Any, buffer: str = sbuf, name: str = "", **_: Any) -> Tensor:
    return _alloc(shape, dtype, buffer, np.nan, name)


def zeros(shape: Any, dtype: Any, buffer: str = sbuf, name: str = "", **_: Any) -> Tensor:
    return _alloc(shape, dtype, buffer, 0.0, name)


def full(shape: Any, fill_value: float, dtype: Any, buffer: str = sbuf, name: str = "", **_: Any) -> Tensor:
    return _alloc(shape, dtype, buffer, fill_value, name)


empty = ndarray


def load(src: Any, mask: Any = None, dtype: Any = None, **_: Any) -> Tensor:
    """HBM -> SBUF by DMA; the result's first dim is the partition dim."""
    acc = src if isinstance(src, Access) else Access(src, (Ellipsis,))
    t = acc.tensor
    vals = acc.read(mask)
    out = Tensor(vals.astype(np.dtype(dtype) if dtype is not None else t.dtype), sbuf)
    _dma(acc, out, "load", mask)
    if mask is not None:
        out.load_mask = np.broadcast_to(np.asarray(mask, dtype=bool), out.shape)
    return out


def _dma(acc: Access, tile: Tensor, name: str, mask: Any) -> None:
    """Record a DMA: bytes moved and the contiguous run length in HBM (descriptor efficiency)."""
    t = acc.tensor
    nbytes = int(np.prod(acc.shape)) * t.dtype.itemsize
    _record("dma", name, [tile] if name == "store" else [], tile if name == "load" else None,
            free=_free(acc.shape), partitions=acc.shape[0] if acc.shape else 1, bytes=nbytes,
            chunk_bytes=builtins.min(_contiguous_bytes(acc, mask), _free(acc.shape) * t.dtype.itemsize))  # one partition per descriptor


def _contiguous_bytes(acc: Access, mask: Any) -> int:
    """Bytes one DMA descriptor moves: the run of consecutive HBM addresses along the access's last axis."""
    t = acc.tensor
    item = t.dtype.itemsize
    if not acc.shape:
        return item
    idx, _ = acc._checked(mask)
    if not any(isinstance(k, np.ndarray) for k in idx):
        run = 1
        for d in range(t.ndim - 1, -1, -1):
            k = idx[d]
            if isinstance(k, int):
                break
            length = len(range(k.start, k.stop, k.step))
            run *= length if k.step == 1 else 1
            if length != t.shape[d] or k.step != 1:
                break
        return run * item
    first_row = (0,) * (len(acc.shape) - 1)
    flat = np.ravel_multi_index(tuple(np.broadcast_to(k, acc.shape)[first_row] for k in idx), t.shape)
    steps = np.diff(flat)
    return (1 + int((steps == 1).cumprod().sum())) * item


def store(dst: Any, value: Any, mask: Any = None, **_: Any) -> None:
    """SBUF -> HBM by DMA."""
    acc = dst if isinstance(dst, Access) else Access(dst, (Ellipsis,))
    if acc.tensor.buffer != "hbm":
        raise NkiUnsupported("nl.store into an on-chip tile (assign to it instead)")
    src = _tensor_of(value)
    if src is None:
        raise TypeError("nl.store: value must be a tile")
    if src.buffer == "psum":  # DMA reads SBUF: NKI copies a PSUM tile to SBUF first, on VectorE
        value = copy(value)
        src = value
    vals = _values(value)
    acc._write(vals.astype(np.float32) if vals.dtype != acc.tensor.dtype else vals, mask)
    _dma(acc, src, "store", mask)


def copy(x: Any, dtype: Any = None, **_: Any) -> Tensor:
    return _unary_result(_values(x), np.dtype(dtype) if dtype is not None else _dtype_of(x), [x], "vector", "copy")


def _act(fn: Callable[[np.ndarray], np.ndarray], name: str) -> Callable[..., Tensor]:
    def op(x: Any, dtype: Any = None, **_: Any) -> Tensor:
        with np.errstate(all="ignore"):
            vals = fn(_f32(x))
        return _unary_result(vals, np.dtype(dtype) if dtype is not None else _dtype_of(x), [x], "scalar", name)

    op.__name__ = name
    op._np = fn  # type: ignore[attr-defined]
    return op


copy._np = lambda x: x  # type: ignore[attr-defined] - nl.copy as an activation function


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


exp = _act(np.exp, "exp")
log = _act(np.log, "log")
tanh = _act(np.tanh, "tanh")
sqrt = _act(np.sqrt, "sqrt")
rsqrt = _act(lambda x: 1.0 / np.sqrt(x), "rsqrt")
square = _act(np.square, "square")
reciprocal = _act(lambda x: 1.0 / x, "reciprocal")
sigmoid = _act(_sigmoid, "sigmoid")
silu = _act(lambda x: x * _sigmoid(x), "silu")
negative = _act(np.negative, "negative")
abs = _act(np.abs, "abs")  # noqa: A001 - nl.abs
relu = _act(lambda x: np.maximum(x, 0), "relu")


def _bin(fn: Callable, name: str) -> Callable[..., Tensor]:
    def op(x: Any, y: Any, dtype: Any = None, **_: Any) -> Tensor:
        return _binary(fn, x, y, dtype)

    op.__name__ = name
    op._np = fn  # type: ignore[attr-defined]
    return op


add = _bin(np.add, "add")
subtract = _bin(np.subtract, "subtract")
multiply = _bin(np.multiply, "multiply")
divide = _bin(np.divide, "divide")
maximum = _bin(np.maximum, "maximum")
minimum = _bin(np.minimum, "minimum")


def _reduce(fn: Callable, name: str) -> Callable[..., Tensor]:
    def op(x: Any, axis: Any, dtype: Any = None, keepdims: bool = False, **_: Any) -> Tensor:
        axes = _reduce_axes(name, axis, len(x.shape))
        vals = fn(_f32(x), axis=axes, keepdims=keepdims)
        return _unary_result(vals, np.dtype(dtype) if dtype is not None else _dtype_of(x), [x], "vector", name,
                             free=_free(x.shape))  # VectorE reads every input element

    op.__name__ = name
    return op


def _reduce_axes(name: str, axis: Any, ndim: int) -> tuple[int, ...]:
    """The reduction axes as non-negative ints: free axes, the trailing ones of the tile."""
    raw = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    if any(not -ndim <= int(a) < ndim for a in raw):
        raise NkiRuleError("reduce-axes", f"nl.{name} axis {axis} of a {ndim}-d tile")
    axes = tuple(sorted({int(a) % ndim for a in raw}))
    if 0 in axes:
        raise NkiUnsupported(f"nl.{name} over the partition axis (use nisa.tensor_partition_reduce or a matmul)")
    if axes != tuple(range(ndim - len(axes), ndim)):
        raise NkiRuleError("reduce-axes", f"nl.{name} over axes {axis} of a {ndim}-d tile: reductions run along "
                           "the last contiguous free axes")
    return axes


sum = _reduce(np.sum, "sum")  # noqa: A001 - nl.sum
max = _reduce(np.max, "max")  # noqa: A001 - nl.max
min = _reduce(np.min, "min")  # noqa: A001 - nl.min
mean = _reduce(np.mean, "mean")


def _matmul_checks(stationary: Any, moving: Any) -> tuple[np.ndarray, np.ndarray]:
    for role, x in (("stationary", stationary), ("moving", moving)):
        t = _tensor_of(x)
        if t is None or t.buffer != "sbuf":
            where = "a Python value" if t is None else t.buffer.upper()
            raise NkiRuleError("matmul-operands", f"matmul {role} operand is in {where}; TensorE reads operands from SBUF")
    s, mv = _values(stationary), _values(moving)
    if s.ndim != 2 or mv.ndim != 2:
        raise NkiRuleError("matmul-shape", f"matmul operands must be 2-d tiles, got {s.shape} and {mv.shape}")
    if s.shape[0] != mv.shape[0]:
        raise NkiRuleError("matmul-shape", f"contraction (partition) sizes differ: stationary {s.shape}, moving {mv.shape}")
    if s.shape[1] > STATIONARY_FMAX:
        raise NkiRuleError("matmul-shape", f"stationary free size {s.shape[1]} > {STATIONARY_FMAX}")
    if mv.shape[1] > MOVING_FMAX:
        raise NkiRuleError("matmul-shape", f"moving free size {mv.shape[1]} > {MOVING_FMAX}")
    return s, mv


def _nc_matmul(stationary: Any, moving: Any, name: str = "matmul") -> Tensor:
    s, mv = _matmul_checks(stationary, moving)
    vals = s.astype(np.float32).T @ mv.astype(np.float32)
    out = Tensor(vals.astype(np.float32), psum)
    fp32 = s.dtype == float32 or mv.dtype == float32
    _record("tensor", name, [stationary, moving], out, free=mv.shape[1], partitions=s.shape[0], fp32=fp32)
    return out


def matmul(x: Any, y: Any, transpose_x: bool = False, **_: Any) -> Tensor:
    """x @ y into PSUM. With transpose_x, x is given as [K, M] (K on partitions) and is the stationary operand."""
    if not transpose_x:
        raise NkiUnsupported("nl.matmul without transpose_x=True (the emulator does not insert transposes)")
    return _nc_matmul(x, y)


def transpose(x: Any, **_: Any) -> Tensor:
    return _isa_transpose(x)


def where(cond: Any, x: Any, y: Any, dtype: Any = None, **_: Any) -> Tensor:
    vx = _f32(x) if isinstance(x, (Tensor, Access)) else np.float32(x)
    vy = _f32(y) if isinstance(y, (Tensor, Access)) else np.float32(y)
    c = _values(cond).astype(bool) if isinstance(cond, (Tensor, Access)) else np.asarray(cond, bool)
    return _unary_result(np.where(c, vx, vy), np.dtype(dtype) if dtype is not None else _dtype_of(x, y), [x, y],
                         "gpsimd", "where")


# ---------------------------------------------------------------- nki.isa (nisa)


def _isa_transpose(data: Any, **_: Any) -> Tensor:
    """PF-transpose on the Tensor Engine (a matmul with the identity): [P, F<=128] -> [F, P] in PSUM."""
    t = _tensor_of(data)
    if t is None or t.buffer != "sbuf":
        raise NkiRuleError("matmul-operands", "nc_transpose reads its input from SBUF")
    v = _values(data)
    if v.ndim != 2 or v.shape[1] > PMAX:
        raise NkiRuleError("matmul-shape", f"nc_transpose input {v.shape}: free size at most {PMAX}")
    out = Tensor(np.ascontiguousarray(v.T).astype(np.float32), psum)
    _record("tensor", "matmul_transpose", [data], out, free=v.shape[0], partitions=v.shape[0], fp32=v.dtype == float32)
    return out


def _np_of(op: Any) -> Callable:
    fn = getattr(op, "_np", None)
    if fn is None:
        raise NkiUnsupported(f"operator {op!r} in an ISA instruction")
    return fn


def _activation(op: Any, data: Any, bias: Any = None, scale: Any = 1.0, dtype: Any = None, **_: Any) -> Tensor:
    """op(data * scale + bias) on the Scalar Engine; scale/bias: a float or a [P, 1] tile."""
    x = _f32(data)
    sc = _f32(scale) if isinstance(scale, (Tensor, Access)) else np.float32(scale)
    b = _f32(bias) if isinstance(bias, (Tensor, Access)) else np.float32(0.0 if bias is None else bias)
    with np.errstate(all="ignore"):
        vals = _np_of(op)(x * sc + b)
    return _unary_result(vals, np.dtype(dtype) if dtype is not None else _dtype_of(data), [data, scale, bias],
                         "scalar", "activation")


def _activation_reduce(op: Any, data: Any, reduce_op: Any, reduce_res: Tensor, bias: Any = None, scale: Any = 1.0,
                       dtype: Any = None, **_: Any) -> Tensor:
    """As activation, and also writes the sum along the free axis into `reduce_res` [P, 1]."""
    if getattr(reduce_op, "__wrapped__", reduce_op) is not add:
        raise NkiUnsupported("activation_reduce with a reduce_op other than nl.add")
    x = _f32(data)
    sc = _f32(scale) if isinstance(scale, (Tensor, Access)) else np.float32(scale)
    b = _f32(bias) if isinstance(bias, (Tensor, Access)) else np.float32(0.0 if bias is None else bias)
    with np.errstate(all="ignore"):
        vals = _np_of(op)(x * sc + b)
    out = _unary_result(vals, np.dtype(dtype) if dtype is not None else _dtype_of(data), [data, scale, bias],
                        "scalar", "activation")
    # over every free axis, before the cast
    reduce_res.data[...] = vals.reshape(vals.shape[0], -1).sum(axis=1, keepdims=True).astype(reduce_res.dtype)
    out.producer.writes.append(reduce_res.buf)  # type: ignore[union-attr]
    return out


def _tensor_tensor(data1: Any, data2: Any, op: Any, dtype: Any = None, engine: Any = None, **_: Any) -> Tensor:
    """Elementwise on two tiles with the same partitions and elements per partition (no broadcasting)."""
    s1, s2 = (tuple(x.shape) if isinstance(x, (Tensor, Access)) else () for x in (data1, data2))
    if not s1 or not s2 or s1[0] != s2[0] or _free(s1) != _free(s2):
        raise NkiRuleError("shape-mismatch", f"nisa.tensor_tensor of {s1 or 'a scalar'} and {s2 or 'a scalar'}: both "
                           "operands are tiles with the same partitions and elements per partition")
    if all(getattr(_tensor_of(x), "buffer", "") == "psum" for x in (data1, data2)):
        raise NkiRuleError("psum-operands", "nisa.tensor_tensor with both operands in PSUM: copy one to SBUF first")
    fn = _np_of(op)
    with np.errstate(all="ignore"):
        vals = fn(_f32(data1), _f32(data2).reshape(s1))
    return _unary_result(vals, np.dtype(dtype) if dtype is not None else _dtype_of(data1, data2), [data1, data2],
                         "gpsimd" if engine == "gpsimd" else "vector", fn.__name__)


def _tensor_scalar(data: Any, op0: Any, operand0: Any, reverse0: bool = False, op1: Any = None, operand1: Any = None,
                   reverse1: bool = False, dtype: Any = None, engine: Any = None, **_: Any) -> Tensor:
    """(data op0 operand0) op1 operand1; reverseN swaps operandN to the left of opN."""
    x = _f32(data)
    o0 = _f32(operand0) if isinstance(operand0, (Tensor, Access)) else np.float32(operand0)
    with np.errstate(all="ignore"):
        v = _np_of(op0)(o0, x) if reverse0 else _np_of(op0)(x, o0)
        if op1 is not None:
            o1 = _f32(operand1) if isinstance(operand1, (Tensor, Access)) else np.float32(operand1)
            v = _np_of(op1)(o1, v) if reverse1 else _np_of(op1)(v, o1)
    eng = "scalar" if engine == "scalar" else "vector"
    return _unary_result(v, np.dtype(dtype) if dtype is not None else _dtype_of(data), [data, operand0, operand1],
                         eng, "tensor_scalar")


def _tensor_reduce(op: Any, data: Any, axis: Any, dtype: Any = None, keepdims: bool = False, **_: Any) -> Tensor:
    red = {"add": sum, "maximum": max, "minimum": min}.get(getattr(op, "__name__", ""))
    if red is None:
        raise NkiUnsupported(f"tensor_reduce with op {op!r}")
    return red(data, axis=axis, dtype=dtype, keepdims=keepdims)


def _tensor_copy(src: Any, dtype: Any = None, engine: Any = None, **_: Any) -> Tensor:
    eng = engine if engine in ("scalar", "gpsimd") else "vector"
    return _unary_result(_values(src), np.dtype(dtype) if dtype is not None else _dtype_of(src), [src], eng, "copy")


def _affine_select(pred: Any, on_true_tile: Any, on_false_value: float, dtype: Any = None, **_: Any) -> Tensor:
    v = _f32(on_true_tile)
    c = np.broadcast_to(np.asarray(pred, dtype=bool), v.shape)
    return _unary_result(np.where(c, v, np.float32(on_false_value)),
                         np.dtype(dtype) if dtype is not None else _dtype_of(on_true_tile), [on_true_tile],
                         "gpsimd", "affine_select")


def _partition_all_reduce(op: Any, data: Any, **_: Any) -> Tensor:
    raise NkiUnsupported("nisa.tensor_partition_reduce / partition all-reduce (use a matmul with a ones tile)")


def _dma_copy(dst: Any, src: Any, mask: Any = None, **_: Any) -> None:
    d, s = _tensor_of(dst), _tensor_of(src)
    if d is None or s is None:
        raise TypeError("dma_copy: dst and src must be tensors")
    if s.buffer == "hbm" and d.buffer != "hbm":
        dst_acc = dst if isinstance(dst, Access) else Access(dst, (Ellipsis,))
        dst_acc.write(load(src, mask=mask))
    elif d.buffer == "hbm":
        store(dst, src, mask=mask)
    else:
        raise NkiUnsupported("dma_copy between two on-chip tiles")


# ---------------------------------------------------------------- module shims and running a kernel


def _module(name: str, **attrs: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    return mod


def _jit(fn: Callable | None = None, **_: Any) -> Any:
    if fn is None:
        return lambda f: f
    return fn


def _benchmark(*_a: Any, **_k: Any) -> Callable:
    raise NkiUnsupported("nki.benchmark (needs a NeuronCore); the emulator estimates latency with the trn1 cost model")


_NL_NAMES = ("PMAX", "arange", "par_dim", "ds", "affine_range", "static_range", "sequential_range", "ndarray", "zeros",
             "full", "empty", "load", "store", "copy", "exp", "log", "tanh", "sqrt", "rsqrt", "square", "reciprocal",
             "sigmoid", "silu", "negative", "abs", "relu", "add", "subtract", "multiply", "divide", "maximum",
             "minimum", "sum", "max", "min", "mean", "matmul", "transpose", "where", "sbuf", "psum", "hbm",
             "shared_hbm", "private_hbm", "bfloat16", "float32", "float16", "int32")


# Compute instructions that take `mask=` (loads, stores and DMA copies handle their own masks).
_MASKABLE_NL = ("copy", "exp", "log", "tanh", "sqrt", "rsqrt", "square", "reciprocal", "sigmoid", "silu", "negative",
                "abs", "relu", "add", "subtract", "multiply", "divide", "maximum", "minimum", "sum", "max", "min", "mean",
                "where")


def _masked(op: Callable[..., Any]) -> Callable[..., Any]:
    """`op` with NKI's `mask=`: only the elements where the mask holds are computed. Assigned to a tile, the
    result writes only those (as a masked load's does); the others are undefined (NaN)."""

    @functools.wraps(op)
    def run(*args: Any, mask: Any = None, **kwargs: Any) -> Any:
        out = op(*args, **kwargs)
        if mask is None or not isinstance(out, Tensor):
            return out
        m = np.broadcast_to(np.asarray(mask, dtype=bool), out.shape)
        if out.data.dtype.kind == "f" or out.data.dtype == bfloat16:
            out.data = np.where(m, out.data, np.float32(np.nan)).astype(out.data.dtype)
        out.load_mask = m
        return out

    for attr in ("_np",):  # nl.exp etc. also serve as activation functions
        if hasattr(op, attr):
            setattr(run, attr, getattr(op, attr))
    return run


def _unmaskable(op: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(op)
    def run(*args: Any, mask: Any = None, **kwargs: Any) -> Any:
        if mask is not None:
            raise NkiUnsupported(f"{name} with mask= (mask the tiles it reads or the tile its result goes to)")
        return op(*args, **kwargs)

    return run


def shim_modules() -> dict[str, types.ModuleType]:
    """`neuronxcc`, `neuronxcc.nki`, `.language`, `.isa` as the emulator provides them."""
    g = globals()
    nl_attrs = {n: _masked(g[n]) if n in _MASKABLE_NL else g[n] for n in _NL_NAMES}
    nl_attrs.update(matmul=_unmaskable(matmul, "nl.matmul"), transpose=_unmaskable(transpose, "nl.transpose"))
    nl = _module("neuronxcc.nki.language", **nl_attrs, tile_size=_TileSize, mgrid=_MGrid())
    nisa = _module(
        "neuronxcc.nki.isa", nc_matmul=_unmaskable(_nc_matmul, "nisa.nc_matmul"),
        nc_transpose=_unmaskable(_isa_transpose, "nisa.nc_transpose"), activation=_masked(_activation),
        activation_reduce=_unmaskable(_activation_reduce, "nisa.activation_reduce"),
        tensor_tensor=_masked(_tensor_tensor), tensor_scalar=_masked(_tensor_scalar),
        tensor_reduce=_masked(_tensor_reduce), tensor_copy=_masked(_tensor_copy), affine_select=_masked(_affine_select),
        dma_copy=_dma_copy, tensor_partition_reduce=_partition_all_reduce,
    )
    nki = _module("neuronxcc.nki", language=nl, isa=nisa, jit=_jit, baremetal=_jit, benchmark=_benchmark)
    root = _module("neuronxcc", nki=nki, EMULATED=True)
    return {"neuronxcc": root, "neuronxcc.nki": nki, "neuronxcc.nki.language": nl, "neuronxcc.nki.isa": nisa}


@contextlib.contextmanager
def _shims() -> Iterator[None]:
    saved = {k: sys.modules.get(k) for k in ("neuronxcc", "neuronxcc.nki", "neuronxcc.nki.language", "neuronxcc.nki.isa")}
    sys.modules.update(shim_modules())
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


KERNEL_NAME = "kernel"


def _check_source_rules(tree: ast.AST) -> None:
    """Rules the emulator sees only in the source: NumPy evaluates `a & b` of two index comparisons as well as
    one comparison, NKI's affine_select refuses it."""
    def compound(e: Any) -> bool:
        return isinstance(e, ast.BoolOp) or (isinstance(e, ast.BinOp) and isinstance(e.op, (ast.BitAnd, ast.BitOr))) \
            or (isinstance(e, ast.UnaryOp) and isinstance(e.op, (ast.Invert, ast.Not)))

    # what each name is assigned anywhere in the source: a predicate built first and passed by name counts too
    assigned: dict[str, list[Any]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    assigned.setdefault(t.id, []).append(node.value)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if name != "affine_select":
            continue
        pred = next((kw.value for kw in node.keywords if kw.arg == "pred"), node.args[0] if node.args else None)
        values = assigned.get(pred.id, []) if isinstance(pred, ast.Name) else [pred]
        if any(compound(v) for v in values):
            raise NkiRuleError("affine-select-pred", f"line {node.lineno}: nisa.affine_select(pred={ast.unparse(pred)}) "
                               "combines conditions; its predicate is one comparison (use two affine_selects, or "
                               "nl.where)")


def load_source(code: str) -> Callable:
    """Execute kernel source with the emulator's modules; returns its function called `kernel`."""
    tree = ast.parse(code, "<nki kernel>")
    _check_source_rules(tree)
    # neuronx-cc makes a bare `range` in a kernel a sequential_range
    namespace: dict[str, Any] = {"__name__": "nki_kernel", "range": sequential_range}
    with _shims():
        exec(compile(tree, "<nki kernel>", "exec"), namespace)  # noqa: S102 - kernels are our own or the user's model's
    fn = namespace.get(KERNEL_NAME)
    if not callable(fn):
        raise ValueError(f"the NKI source defines no function called {KERNEL_NAME!r}")
    return fn


@dataclass
class RunResult:
    outputs: list[np.ndarray]
    ops: list[Op]
    peak_sbuf_bytes: int


def run_kernel(fn: Callable, inputs: list[np.ndarray], scalars: list[int] = ()) -> RunResult:
    """Run an NKI kernel `fn(*inputs, *scalars)` on the emulator. Inputs are HBM tensors (bf16 arrays as
    `ml_dtypes.bfloat16`); the kernel returns its HBM output(s) (`nl.ndarray(..., buffer=nl.shared_hbm)`)."""
    global _MACHINE
    machine = Machine()
    prev, _MACHINE = _MACHINE, machine
    try:
        with _shims():
            hbm_in = [Tensor(np.asarray(a), hbm, f"in{i}") for i, a in enumerate(inputs)]
            out = fn(*hbm_in, *scalars)
        outs = out if isinstance(out, (tuple, list)) else [out]
        for o in outs:
            if not isinstance(o, Tensor) or o.buffer != "hbm":
                raise ValueError("an NKI kernel returns its HBM output tensor(s) (nl.ndarray(..., buffer=nl.shared_hbm))")
        return RunResult([o.data for o in outs], machine.ops, machine.peak_sbuf)
    finally:
        _MACHINE = prev
