"""The 4-bit and 8-bit formats: code tables, the quantization state of a 4-bit weight, and its
(de)serialization under bitsandbytes' state_dict keys so checkpoints interoperate both ways.

A leaf of the package: it imports torch and nothing of lowbit, so every other module may use it."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

QUANT_TYPES = ("nf4", "fp4")
MIN_BLOCKSIZE, MAX_BLOCKSIZE = 32, 4096
NESTED_BLOCKSIZE = 256

# bitsandbytes' checkpoint names. A 4-bit weight's quant state is saved beside it as "<weight>.<name>";
# an int8 layer saves its row scales and layout flag beside its "weight".
ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_QUANT_MAP = "absmax", "quant_map", "nested_absmax", "nested_quant_map"
QUANT_STATE_GROUP = "quant_state."
QUANT_STATE = QUANT_STATE_GROUP + "bitsandbytes__"  # + quant_type: the JSON of shape, dtype, blocksize, ...
INT8_SCALES, INT8_FORMAT = "SCB", "weight_format"

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


def check_threshold(threshold: float, what: str = "threshold") -> float:
    """LLM.int8()'s outlier threshold: finite and >= 0 (0 disables the outlier columns)."""
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


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    name = str(name).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {list(_DTYPES)}")
    return _DTYPES[name]


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

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "weight.") -> "QuantState4bit":
        """Parse and validate the quant-state tensors of one weight (keys as to_state_dict writes them)."""
        meta_keys = [k for k in tensors if k.startswith(prefix + QUANT_STATE_GROUP)]
        if len(meta_keys) != 1:
            raise ValueError(
                f"expected exactly one '{prefix}{QUANT_STATE}nf4|fp4' entry, found {meta_keys or 'none'}"
            )
        key = meta_keys[0]
        suffix = key.rsplit("__", 1)[-1]
        try:
            meta = json.loads(bytes(tensors[key].to("cpu", torch.uint8).flatten().tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"corrupt quant_state in '{key}': not valid JSON ({e})") from e
        missing = {"quant_type", "blocksize", "dtype", "shape"} - set(meta)
        if missing:
            raise ValueError(f"quant_state in '{key}' lacks {sorted(missing)}")
        quant_type = check_quant_type(meta["quant_type"])
        if suffix != quant_type:
            raise ValueError(f"quant_state key '{key}' says {suffix!r} but its contents say {quant_type!r}")
        blocksize = check_blocksize(int(meta["blocksize"]))
        shape = tuple(int(s) for s in meta["shape"])
        for name in (ABSMAX, QUANT_MAP):
            if prefix + name not in tensors:
                raise ValueError(f"checkpoint lacks '{prefix}{name}' for a 4-bit weight")
        absmax, code = tensors[prefix + ABSMAX], tensors[prefix + QUANT_MAP]
        if code.numel() != 16 or code.dtype != torch.float32:
            raise ValueError(f"'{prefix}quant_map' must be 16 float32 values, got {code.numel()} {code.dtype}")
        if code.device.type != "meta" and not torch.equal(code.cpu(), _code_4bit(quant_type)):
            # The kernels decode with the built-in table; a different map would be silently ignored.
            raise ValueError(f"'{prefix}quant_map' is not the standard {quant_type} table (custom 4-bit maps "
                             "are not supported)")
        state = cls(quant_type, blocksize, shape, parse_dtype(meta["dtype"]), absmax, code)
        n_blocks = -(-state.numel // blocksize)
        if absmax.numel() != n_blocks:
            raise ValueError(
                f"'{prefix}absmax' has {absmax.numel()} entries but a {list(shape)} weight with blocksize "
                f"{blocksize} has {n_blocks} blocks (truncated or mismatched checkpoint?)"
            )
        if prefix + NESTED_ABSMAX in tensors or "nested_offset" in meta:
            for name in (NESTED_ABSMAX, NESTED_QUANT_MAP):
                if prefix + name not in tensors:
                    raise ValueError(f"checkpoint lacks '{prefix}{name}' for a double-quantized weight")
            if "nested_offset" not in meta or "nested_blocksize" not in meta:
                raise ValueError(f"quant_state in '{key}' lacks nested_offset/nested_blocksize")
            nested = NestedState(
                tensors[prefix + NESTED_ABSMAX],
                tensors[prefix + NESTED_QUANT_MAP],
                float(meta["nested_offset"]),
                check_blocksize(int(meta["nested_blocksize"])),
            )
            if absmax.dtype != torch.uint8:
                raise ValueError(f"'{prefix}absmax' of a double-quantized weight must be uint8, got {absmax.dtype}")
            for name, t in (("nested_quant_map", nested.code), ("nested_absmax", nested.absmax)):
                if t.dtype != torch.float32:
                    raise ValueError(f"'{prefix}{name}' must be float32, got {t.dtype}")
            if nested.code.numel() != 256:
                raise ValueError(f"'{prefix}nested_quant_map' must have 256 entries, got {nested.code.numel()}")
            if nested.absmax.numel() != -(-n_blocks // nested.blocksize):
                raise ValueError(f"'{prefix}nested_absmax' has {nested.absmax.numel()} entries, expected "
                                 f"{-(-n_blocks // nested.blocksize)}")
            state.nested = nested
        elif absmax.dtype != torch.float32:
            raise ValueError(f"'{prefix}absmax' must be float32, got {absmax.dtype}")
        scales = [state.absmax] if state.nested is None else [state.nested.absmax, state.nested.code]
        if any(t.device.type != "meta" and not torch.isfinite(t).all() for t in scales):
            raise ValueError(f"the scales of '{prefix[:-1]}' hold NaN/Inf (corrupt checkpoint)")
        return state


def check_packed(packed: torch.Tensor, numel: int, what: str = "weight") -> torch.Tensor:
    """The packed bytes as uint8 (any quant_storage dtype is a view of the same bytes)."""
    raw = packed.contiguous().view(torch.uint8) if packed.dtype != torch.uint8 else packed
    if raw.numel() != (numel + 1) // 2:
        raise ValueError(f"packed {what} has {raw.numel()} bytes, expected {(numel + 1) // 2} for {numel} elements "
                         "(truncated or mismatched checkpoint?)")
    return raw
