"""Safetensors checkpoint directories, read and written a slice of a tensor at a time.

Why not `safetensors.safe_open`: it memory-maps each file, and every page a merge touches
stays resident (and counted in RSS) until the file is closed, so reading a whole model that
way costs the whole model in memory; `get_tensor` also needs a tensor in one piece. The
format is simple (8-byte little-endian header length, a JSON header, then raw little-endian
bytes), so here it is read with plain `readinto` at known offsets and written with a header
planned up front, which lets a merge hold only a fixed-size chunk of each input at a time.
Files written here load with `safetensors` and `transformers` like any other checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from taxfree.errors import TaxfreeError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, the absolute byte offset of its data, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path | None = None
    offset: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def parse_size(size: int | str) -> int:
    """'5GB' -> 5e9 bytes, '200KiB' -> 204800; HF's convention (KB/MB/GB decimal, KiB... binary)."""
    if isinstance(size, int):
        if size <= 0:
            raise TaxfreeError(f"shard size must be positive, got {size}")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not match:
        raise TaxfreeError(f"cannot read size {size!r} (expected e.g. 5GB, 500MB, 200KiB or bytes)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    if unit not in powers:
        raise TaxfreeError(f"cannot read size {size!r}: unknown unit {match.group(2)}")
    value = int(number * powers[unit])
    if value <= 0:
        raise TaxfreeError(f"shard size must be positive, got {size!r}")
    return value


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of one .safetensors file, checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise TaxfreeError(f"{path}: not a safetensors file (too short)")
            header_len = int.from_bytes(raw_len, "little")
            if header_len > _MAX_HEADER_BYTES:
                raise TaxfreeError(f"{path}: not a safetensors file (bad header length {header_len})")
            if 8 + header_len > size:
                raise TaxfreeError(f"{path}: truncated or not a safetensors file (its header says {header_len} bytes, "
                                   f"the file has {size})")
            header = json.loads(f.read(header_len))
    except OSError as e:
        raise TaxfreeError(f"{path}: cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TaxfreeError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise TaxfreeError(f"{path}: not a safetensors file (header is not a JSON object)")
    data_start = 8 + header_len
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise TaxfreeError(f"{path}: tensor {name!r}: unsupported or malformed entry {entry!r}") from None
        info = TensorInfo(name, dtype, shape, path, data_start + begin)
        if end - begin != info.nbytes or data_start + end > size:
            why = "the file is truncated" if data_start + end > size else "they do not fit its shape"
            raise TaxfreeError(f"{path}: tensor {name!r}: data offsets {begin}..{end}: {why}")
        infos[name] = info
    return infos


class Checkpoint:
    """A Hugging Face checkpoint directory (config.json + safetensors, sharded or not), read lazily.

    Only headers are read on open; `read_flat` reads one slice of one tensor. Tensors are listed
    in file order (shard, then offset) so a full pass reads every file front to back.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise TaxfreeError(f"{self.directory}: no such checkpoint directory")
        config_path = self.directory / "config.json"
        try:
            self.config: dict = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise TaxfreeError(f"{self.directory}: no config.json (not a Hugging Face checkpoint)") from None
        except (OSError, ValueError) as e:
            raise TaxfreeError(f"{config_path}: cannot read: {e}") from None
        if not isinstance(self.config, dict):
            raise TaxfreeError(f"{config_path}: expected a JSON object, got {type(self.config).__name__}")
        self.tensors: dict[str, TensorInfo] = self._read_tensor_infos()
        self._files: dict[Path, object] = {}

    def _read_tensor_infos(self) -> dict[str, TensorInfo]:
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError):
                raise TaxfreeError(f"{index}: cannot read the weight_map of this index") from None
            files = sorted(set(weight_map.values()))
            headers = {f: read_safetensors_header(self._weight_file(f)) for f in files}
            for name, file in weight_map.items():
                if name not in headers[file]:
                    raise TaxfreeError(f"{index}: tensor {name!r} is not in {file}")
            infos = [headers[file][name] for name, file in weight_map.items()]
        elif (self.directory / SINGLE_NAME).is_file():
            infos = list(read_safetensors_header(self.directory / SINGLE_NAME).values())
        else:
            others = sorted(p.name for p in self.directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            hint = f" (found {others[0]}: pickle weights are not read; convert them to safetensors)" if others else ""
            raise TaxfreeError(f"{self.directory}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")
        infos.sort(key=lambda i: (str(i.path), i.offset))
        return {i.name: i for i in infos}

    def _weight_file(self, file: str) -> Path:
        path = self.directory / file
        if not path.is_file():
            raise TaxfreeError(f"{self.directory}: shard {file} named in the index is missing")
        return path

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def read_flat(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, stop) of tensor `name`, flattened, in its own dtype.

        `out` (a uint8 buffer at least that many bytes long) is reused instead of allocating.
        """
        info = self.tensors[name]
        itemsize = info.dtype.itemsize
        nbytes = (stop - start) * itemsize
        buf = torch.empty(nbytes, dtype=torch.uint8) if out is None else out[:nbytes]
        f = self._files.get(info.path)
        if f is None:
            f = self._files[info.path] = open(info.path, "rb", buffering=0)
        f.seek(info.offset + start * itemsize)
        view = memoryview(buf.numpy())
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise TaxfreeError(f"{info.path}: file ended inside tensor {name!r}")
            got += n
        return buf.view(info.dtype)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def auxiliary_files(self) -> list[Path]:
        """Top-level files other than weights (config, tokenizer, generation config, chat template)."""
        return sorted(
            p for p in self.directory.iterdir()
            if p.is_file() and not p.name.startswith(".")
            and not p.name.endswith(_WEIGHT_SUFFIXES) and not p.name.endswith(".index.json")
        )


class InMemoryCheckpoint:
    """Tensors already in memory (e.g. a model's state dict) behind the same interface as Checkpoint."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], config: dict | None = None):
        self._tensors = {name: t.detach() for name, t in tensors.items()}
        self.config = dict(config or {})
        self.tensors = {name: TensorInfo(name, t.dtype, tuple(t.shape)) for name, t in self._tensors.items()}

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def read_flat(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensors[name].reshape(-1)[start:stop].cpu()

    def close(self) -> None:
        pass


def _header_bytes(infos: Sequence[TensorInfo]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for info in infos:
        header[info.name] = {
            "dtype": DTYPE_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


def plan_shards(infos: Sequence[TensorInfo], max_shard_size: int) -> list[list[TensorInfo]]:
    """Greedy split in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


class ShardedWriter:
    """Write tensors, in a fixed order known up front, as HF-style safetensors shards.

    One shard is `model.safetensors`; several are `model-0000i-of-0000n.safetensors` plus
    `model.safetensors.index.json` (what `save_pretrained` writes). Data arrive in slices via
    `append`, so no tensor is ever held whole.
    """

    def __init__(self, out_dir: str | os.PathLike, infos: Iterable[TensorInfo], max_shard_size: int | str = "5GB"):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        infos = [TensorInfo(i.name, i.dtype, tuple(i.shape)) for i in infos]
        for info in infos:
            if info.dtype not in DTYPE_NAMES:
                raise TaxfreeError(f"tensor {info.name!r}: dtype {info.dtype} cannot be stored in safetensors")
        self.shards = plan_shards(infos, parse_size(max_shard_size))
        n = len(self.shards)
        self.files = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue = [(s, info) for s, shard in enumerate(self.shards) for info in shard]
        self._pos = 0  # index into _queue of the tensor being written
        self._written = 0  # bytes of that tensor written so far
        self._shard = -1
        self._file = None
        self.total_bytes = sum(i.nbytes for i in infos)
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._pos < len(self._queue) and self._queue[self._pos][1].nbytes == 0:
            self._open_shard(self._queue[self._pos][0])
            self._pos += 1

    def _open_shard(self, shard: int) -> None:
        if shard == self._shard:
            return
        if self._file is not None:
            self._file.close()
        self._shard = shard
        self._file = open(self.out_dir / self.files[shard], "wb", buffering=0)
        self._file.write(_header_bytes(self.shards[shard]))

    @property
    def expected(self) -> TensorInfo | None:
        """The tensor whose bytes `append` takes next (None when all are written)."""
        return self._queue[self._pos][1] if self._pos < len(self._queue) else None

    def append(self, name: str, flat: torch.Tensor) -> None:
        """Append the next slice (1-D, the tensor's dtype) of tensor `name`."""
        info = self.expected
        if info is None or info.name != name:
            raise RuntimeError(f"writer expected {info.name if info else 'nothing'}, got {name}")
        if flat.dtype != info.dtype:
            raise RuntimeError(f"{name}: writing {flat.dtype} into a {info.dtype} tensor")
        data = flat.contiguous().view(torch.uint8)
        if self._written + data.numel() > info.nbytes:
            raise RuntimeError(f"{name}: more bytes than its shape holds")
        self._open_shard(self._queue[self._pos][0])
        view = memoryview(data.numpy())
        done = 0
        while done < len(view):
            done += self._file.write(view[done:])
        self._written += data.numel()
        if self._written == info.nbytes:
            self._pos += 1
            self._written = 0
            self._skip_empty()

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Finish: every tensor must be complete; writes the index when there are several shards."""
        if self.expected is not None:
            raise RuntimeError(f"writer closed before tensor {self.expected.name} was written")
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.files) > 1:
            weight_map = {info.name: self.files[s] for s, info in self._queue}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
