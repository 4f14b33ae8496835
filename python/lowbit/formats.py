"""The 4-bit and 8-bit formats: code tables, the quantization state of a 4-bit weight, and its
(de)serialization under bitsandbytes' state_dict keys so checkpoints interoperate both ways.

A leaf of the package: it imports torch and nothing of lowbit, so every other module may use it."""

from __future__ import annotations

import functools
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

QUANT_TYPES = ("nf4", "fp4")
MIN_BLOCKSIZE, MAX_BLOCKSIZE = 32, 4096
NESTED_BLOCKSIZE = 256
# The scales the 4-bit scale search tries, as fractions of the block's absmax (before its least-squares
# refit): clipping the largest weight of a block by up to 30% often lowers the error of all the others.
SCALE_SEARCH_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)

# bitsandbytes' checkpoint names. A 4-bit weight's quant state is saved beside it as "<weight>.<name>";
# an int8 layer saves its row scales and layout flag beside its "weight".
ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_QUANT_MAP = "absmax", "quant_map", "nested_absmax", "nested_quant_map"
QUANT_STATE_GROUP = "quant_state."
QUANT_STATE = QUANT_STATE_GROUP + "bitsandbytes__"  # + quant_type: the JSON of shape, dtype, blocksize, ...
INT8_SCALES, INT8_FORMAT = "SCB", "weight_format"
# The int8 matmul accumulates K products of int8 values (each at most 128 * 128) in int32.
MAX_INT8_K = (2**31 - 1) // (128 * 128)

# Same numbers as csrc/formats.h (the C++ kernels carry their own copy; tests check they agree).
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)  # divided by 12; bit 3 is the sign


@functools.cache
def _code_4bit(quant_type: str) -> torch.Tensor:
    # Built on the CPU explicitly: a cached tensor must not pick up a `with torch.device("meta")`
    # (transformers builds models under one) from whoever calls first.
    if quant_type == "nf4":
        return torch.tensor(NF4, dtype=torch.float32, device="cpu")
    if quant_type == "fp4":
        mags = torch.tensor(FP4_MAGNITUDES, dtype=torch.float32, device="cpu")
        return torch.cat([mags, -mags]) / 12.0
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def code_4bit(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 values of a 4-bit code (index = code)."""
    return _code_4bit(quant_type).to(device or "cpu", copy=True)


@functools.cache
def _dynamic_map() -> torch.Tensor:
    # The signed 8-bit "dynamic" map: for each decimal exponent 10^-6 .. 10^0, a linear fraction
    # grid whose resolution doubles with the exponent, mirrored for negatives, plus 0 and 1.
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32, device="cpu")
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (i - 6)
        values += (scale * mids).tolist() + (-scale * mids).tolist()  # scaled in float32, as the reference
    return torch.tensor(sorted(values), dtype=torch.float32, device="cpu")


def dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """The sorted 256-entry signed code used to double-quantize 4-bit absmax values."""
    return _dynamic_map().to(device or "cpu", copy=True)


def check_blocksize(blocksize: int) -> int:
    if not isinstance(blocksize, int) or isinstance(blocksize, bool):
        raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__}")
    if blocksize < MIN_BLOCKSIZE or blocksize > MAX_BLOCKSIZE or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [{MIN_BLOCKSIZE}, {MAX_BLOCKSIZE}], got {blocksize}")
    return blocksize


@contextmanager
def named_errors(prefix: str, suffix: str = ""):
    """Re-raise a ValueError/TypeError from the block with `prefix: ` (and ` suffix`) around its message, so it
    names what it is about (a layer, a config field, a checkpoint entry)."""
    try:
        yield
    except (TypeError, ValueError) as e:
        raise type(e)(f"{prefix}: {e}" + (f" {suffix}" if suffix else "")) from None


def check_threshold(threshold: float, what: str = "threshold") -> float:
    """LLM.int8()'s outlier threshold: finite and >= 0 (0 disables the outlier columns)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"{what} must be a number, got {type(threshold).__name__} {threshold!r}")
    value = float(threshold)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{what} must be finite and >= 0 (0 disables outliers), got {threshold}")
    return value


def check_quant_type(quant_type: str) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    return quant_type


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A floating dtype lowbit computes in ("float32", "float16", "bfloat16", or the torch.dtype)."""
    if not isinstance(dtype, (str, torch.dtype)):
        raise TypeError(f"dtype must be a torch.dtype or its name, got {type(dtype).__name__} {dtype!r}")
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype.removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {list(_DTYPES)}")
    return _DTYPES[name]


# dtypes the packed 4-bit bytes may be stored as (viewed, never cast; float ones are for FSDP).
STORAGE_DTYPES = (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32)


def parse_storage(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {[dtype_name(d) for d in STORAGE_DTYPES]}, got {dtype!r}")
    return dtype


def nested_offset(absmax: torch.Tensor) -> float:
    """What double quantization subtracts from the block scales before quantizing them: their mean, as
    bitsandbytes takes it, but summed exactly (math.fsum) and rounded once to float32, so that the same weight
    gives the same checkpoint on every device and thread count. ATen's float32 mean does not: its summation
    order follows the device and the number of threads (1 and 8 CPU threads gave different offsets for 115 of
    200 random absmax vectors), and bitsandbytes' offset inherits that."""
    if absmax.numel() == 0:
        return 0.0
    mean = math.fsum(absmax.detach().to("cpu", torch.float64).tolist()) / absmax.numel()
    return torch.tensor(mean, dtype=torch.float32).item()


@dataclass
class NestedState:
    """Double quantization of the absmax: code[q] * absmax[i // blocksize] + offset."""

    absmax: torch.Tensor  # float32 [ceil(n_blocks / blocksize)]
    code: torch.Tensor  # float32 [256]
    offset: float
    blocksize: int = NESTED_BLOCKSIZE

    def decode(self, absmax_q: torch.Tensor) -> torch.Tensor:
        """The float32 block scales from their uint8 codes (the one place this formula is written in
        Python; csrc/formats.h `nested_scale` is its C++ twin). Multiply, then add, both rounded in
        float32, as the kernels compute it."""
        block = torch.arange(absmax_q.numel(), device=absmax_q.device) // self.blocksize
        return self.code[absmax_q.reshape(-1).long()] * self.absmax[block] + self.offset

    def op_args(self) -> tuple:
        """The trailing (nested_absmax, nested_code, nested_offset, nested_blocksize) arguments of lowbit::linear_4bit."""
        return self.absmax, self.code, self.offset, self.blocksize

    @classmethod
    def from_op_args(cls, absmax, code, offset, blocksize) -> Optional["NestedState"]:
        return None if absmax is None else cls(absmax, code, offset, blocksize)


# linear_4bit's nested arguments when the absmax is plain float32 (the schema's defaults).
NO_NESTED_ARGS = (None, None, 0.0, NESTED_BLOCKSIZE)


def nested_op_args(nested: Optional[NestedState]) -> tuple:
    return NO_NESTED_ARGS if nested is None else nested.op_args()


@dataclass
class QuantState4bit:
    """Everything besides the packed bytes that a 4-bit weight needs to be dequantized."""

    quant_type: str
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype  # the dtype the weight had before quantization
    absmax: torch.Tensor  # float32 [n_blocks], or uint8 codes when nested
    code: torch.Tensor  # float32 [16]
    nested: Optional[NestedState] = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def float_absmax(self) -> torch.Tensor:
        """The per-block scales as float32, undoing double quantization if present."""
        return self.absmax if self.nested is None else self.nested.decode(self.absmax)

    # -- bitsandbytes-compatible serialization -------------------------------------------------

    def to_state_dict(self, prefix: str = "weight.") -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes writes beside a packed 4-bit weight (without the weight itself)."""
        meta = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        out = {prefix + ABSMAX: self.absmax, prefix + QUANT_MAP: self.code}
        if self.nested is not None:
            out[prefix + NESTED_ABSMAX] = self.nested.absmax
            out[prefix + NESTED_QUANT_MAP] = self.nested.code
            meta.update(
                nested_blocksize=self.nested.blocksize, nested_dtype="float32", nested_offset=float(self.nested.offset)
            )
        packed_meta = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        out[prefix + QUANT_STATE + self.quant_type] = packed_meta
        return out

    @staticmethod
    def declared_shape(tensors: Mapping[str, torch.Tensor], prefix: str = "weight.") -> tuple[int, ...]:
        """The weight shape a quant_state entry declares (its JSON alone, validated)."""
        return _json_shape(*_quant_state_json(tensors, prefix))

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "weight.") -> "QuantState4bit":
        """Parse and validate the quant-state tensors of one weight (keys as to_state_dict writes them).

        Everything that scales the weight is checked here, once, so a corrupt or hostile checkpoint raises
        a ValueError/TypeError naming the key and field instead of computing with it: the JSON's fields and
        their types, the sizes of every tensor, and the scales (finite; plain absmax >= 0; nested maps in
        [-1, 1], nested absmax >= 0, the offset a finite float32, the decoded scales finite)."""
        key, meta = _quant_state_json(tensors, prefix)
        shape = _json_shape(key, meta)
        quant_type = _json_field(meta, "quant_type", "a string", key)
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"'{key}': quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        if key != prefix + QUANT_STATE + quant_type:
            suffix = key.removeprefix(prefix + QUANT_STATE)
            raise ValueError(f"quant_state key '{key}' says {suffix!r} but its contents say {quant_type!r}")
        blocksize = _checked(check_blocksize, _json_field(meta, "blocksize", "an integer", key), key, "blocksize")
        dtype = _checked(parse_dtype, _json_field(meta, "dtype", "a string", key), key, "dtype")
        for name in (ABSMAX, QUANT_MAP):
            if prefix + name not in tensors:
                raise ValueError(f"checkpoint lacks '{prefix}{name}' for a 4-bit weight")
        absmax, code = tensors[prefix + ABSMAX], tensors[prefix + QUANT_MAP]
        if code.numel() != 16 or code.dtype != torch.float32:
            raise ValueError(f"'{prefix}quant_map' must be 16 float32 values, got {code.numel()} {code.dtype}")
        if _has_values(code) and not torch.equal(code.cpu(), _code_4bit(quant_type)):
            # The kernels decode with the built-in table; a different map would be silently ignored.
            raise ValueError(f"'{prefix}quant_map' is not the standard {quant_type} table (custom 4-bit maps "
                             "are not supported)")
        state = cls(quant_type, blocksize, shape, dtype, absmax, code)
        n_blocks = -(-state.numel // blocksize)
        if absmax.numel() != n_blocks:
            raise ValueError(
                f"'{prefix}absmax' has {absmax.numel()} entries but a {list(shape)} weight with blocksize "
                f"{blocksize} has {n_blocks} blocks (truncated or mismatched checkpoint?)"
            )
        nested_names = (NESTED_ABSMAX, NESTED_QUANT_MAP)
        if any(prefix + name in tensors for name in nested_names) or any(f in meta for f in _NESTED_FIELDS):
            state.nested = _nested_state(tensors, prefix, meta, key, n_blocks)
        elif absmax.dtype != torch.float32:
            raise ValueError(f"'{prefix}absmax' must be float32, got {absmax.dtype}")
        elif _has_values(absmax) and not (torch.isfinite(absmax) & (absmax >= 0)).all():
            raise ValueError(f"'{prefix}absmax' holds NaN, Inf or negative scales (corrupt checkpoint)")
        return state


_NESTED_FIELDS = ("nested_offset", "nested_blocksize")


def _has_values(t: torch.Tensor) -> bool:
    return t.device.type != "meta"


def _quant_state_json(tensors: Mapping[str, torch.Tensor], prefix: str) -> tuple[str, dict]:
    """The key of a weight's quant_state entry and its JSON object."""
    keys = [k for k in tensors if k.startswith(prefix + QUANT_STATE_GROUP)]
    if len(keys) != 1:
        raise ValueError(f"expected exactly one '{prefix}{QUANT_STATE}nf4|fp4' entry, found {keys or 'none'}")
    key = keys[0]
    raw = tensors[key]
    if raw.dtype != torch.uint8:
        raise TypeError(f"'{key}' must be uint8 (UTF-8 JSON bytes), got {raw.dtype}")
    try:
        meta = json.loads(bytes(raw.cpu().flatten().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt quant_state in '{key}': not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise TypeError(f"quant_state in '{key}' must be a JSON object, got {type(meta).__name__}")
    missing = {"quant_type", "blocksize", "dtype", "shape"} - set(meta)
    if missing:
        raise ValueError(f"quant_state in '{key}' lacks {sorted(missing)}")
    return key, meta


_JSON_KINDS = {
    "a string": lambda v: isinstance(v, str),
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "a list of non-negative integers": lambda v: isinstance(v, list)
    and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v),
}


def _json_field(meta: dict, field: str, kind: str, key: str):
    value = meta[field]
    if not _JSON_KINDS[kind](value):
        raise TypeError(f"quant_state in '{key}': {field} must be {kind}, got {type(value).__name__} {value!r:.60}")
    return value


def _json_shape(key: str, meta: dict) -> tuple[int, ...]:
    return tuple(_json_field(meta, "shape", "a list of non-negative integers", key))


def _checked(check, value, key: str, field: str):
    """check(value), its error naming the quant_state entry and field."""
    with named_errors(f"quant_state in '{key}': {field}"):
        return check(value)


def _nested_state(tensors: Mapping[str, torch.Tensor], prefix: str, meta: dict, key: str, n_blocks: int) -> NestedState:
    """The double-quantization state of a weight with n_blocks absmax codes, validated."""
    for name in (NESTED_ABSMAX, NESTED_QUANT_MAP):
        if prefix + name not in tensors:
            raise ValueError(f"checkpoint lacks '{prefix}{name}' for a double-quantized weight")
    for field in _NESTED_FIELDS:
        if field not in meta:
            raise ValueError(f"quant_state in '{key}' lacks {field} for a double-quantized weight")
    offset = float(_json_field(meta, "nested_offset", "a number", key))
    if not math.isfinite(offset) or abs(offset) > torch.finfo(torch.float32).max:
        raise ValueError(f"quant_state in '{key}': nested_offset must be a finite float32, got {meta['nested_offset']}")
    blocksize = _checked(check_blocksize, _json_field(meta, "nested_blocksize", "an integer", key), key,
                         "nested_blocksize")  # fmt: skip
    nested = NestedState(tensors[prefix + NESTED_ABSMAX], tensors[prefix + NESTED_QUANT_MAP], offset, blocksize)
    absmax_q = tensors[prefix + ABSMAX]
    if absmax_q.dtype != torch.uint8:
        raise ValueError(f"'{prefix}absmax' of a double-quantized weight must be uint8, got {absmax_q.dtype}")
    for name, t in ((NESTED_QUANT_MAP, nested.code), (NESTED_ABSMAX, nested.absmax)):
        if t.dtype != torch.float32:
            raise ValueError(f"'{prefix}{name}' must be float32, got {t.dtype}")
    if nested.code.numel() != 256:
        raise ValueError(f"'{prefix}nested_quant_map' must have 256 entries, got {nested.code.numel()}")
    if nested.absmax.numel() != -(-n_blocks // blocksize):
        raise ValueError(f"'{prefix}nested_absmax' has {nested.absmax.numel()} entries, expected "
                         f"{-(-n_blocks // blocksize)}")  # fmt: skip
    if _has_values(nested.code) and not (torch.isfinite(nested.code) & (nested.code.abs() <= 1)).all():
        raise ValueError(f"'{prefix}nested_quant_map' holds values outside [-1, 1] or NaN (corrupt checkpoint)")
    if _has_values(nested.absmax) and not (torch.isfinite(nested.absmax) & (nested.absmax >= 0)).all():
        raise ValueError(f"'{prefix}nested_absmax' holds NaN, Inf or negative scales (corrupt checkpoint)")
    if _has_values(absmax_q) and not torch.isfinite(nested.decode(absmax_q)).all():
        raise ValueError(f"the double-quantized scales of '{prefix[:-1]}' overflow float32 (corrupt checkpoint)")
    return nested


def check_packed(packed: torch.Tensor, numel: int, what: str = "weight") -> torch.Tensor:
    """The packed bytes as uint8 (any quant_storage dtype is a view of the same bytes)."""
    raw = packed.contiguous().view(torch.uint8) if packed.dtype != torch.uint8 else packed
    if raw.numel() != (numel + 1) // 2:
        raise ValueError(f"packed {what} has {raw.numel()} bytes, expected {(numel + 1) // 2} for {numel} elements "
                         "(truncated or mismatched checkpoint?)")
    return raw
