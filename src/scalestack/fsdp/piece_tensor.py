"""``PieceTensor``: a global tensor as one rank holds it, the object ``model.state_dict()`` returns for a
sharded parameter (and checkpoints return for optimizer states sharded like it).

It has the global shape and dtype, and its data is this rank's piece: the elements ``[start, end)`` of the
flattened global tensor, a view of the shard buffer (no copy). It speaks the protocol that
``torch.distributed.checkpoint`` asks of tensors that describe their own placement (DTensor's
``__create_write_items__`` / ``__create_chunk_list__`` / ``__get_tensor_shard__``): the piece is registered
as a few rectangular chunks of the global tensor (``boxes``), each a view of the piece. DCP saves each rank's
chunks under their global offsets and reshards on load by its own overlap resolution, so a checkpoint
saved at one world size, granularity or layout loads at any other, or into an unsharded model.

A piece of a ``[R, C]`` weight is at most 3 chunks (head partial row, full rows, tail partial row); of an
n-d tensor at most 2n - 1. Compute on a ``PieceTensor`` is refused: ``to_local()`` is the piece,
``full_tensor()`` the whole (a collective), as for FSDP2's DTensors.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from . import collectives as comm
from .param import ShardInfo

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes) of a rectangular chunk


def boxes(shape: tuple[int, ...], start: int, end: int) -> list[Box]:
    """The rectangular chunks, in memory order, that elements ``[start, end)`` of a flattened row-major
    tensor of ``shape`` fall into: at most ``2 * len(shape) - 1``, none for an empty range."""
    if start >= end:
        return []
    if not shape:
        return [((), ())]
    if len(shape) == 1:
        return [((start,), (end - start,))]
    inner = math.prod(shape[1:])
    first, last = start // inner, (end - 1) // inner

    def within(row: int, lo: int, hi: int) -> list[Box]:
        return [((row, *o), (1, *s)) for o, s in boxes(shape[1:], lo, hi)]

    if first == last:
        return within(first, start - first * inner, end - first * inner)
    out: list[Box] = []
    if start % inner:  # the head: the end of a partial first row
        out += within(first, start % inner, inner)
        first += 1
    full_end = end // inner
    if full_end > first:
        out.append(((first, *(0,) * (len(shape) - 1)), (full_end - first, *shape[1:])))
    if end % inner:  # the tail: the start of a partial last row
        out += within(full_end, 0, end % inner)
    return out


class PieceTensor(torch.Tensor):
    """The global tensor described by ``info`` (``block`` elements of the parameter per element: 1 for
    tensors shaped like it, a quantization block size for per-block states), holding this rank's piece."""

    _local: torch.Tensor
    info: ShardInfo
    block: int

    @staticmethod
    def __new__(cls, local: torch.Tensor, info: ShardInfo, block: int = 1) -> PieceTensor:
        global_shape = _global_shape(info, block)
        start, end = _range(info.start, info.end, block)
        if local.numel() != end - start:
            raise ValueError(
                f"a piece of elements [{start}, {end}) of a {list(global_shape)} tensor has {end - start} elements, "
                f"got a local tensor of {local.numel()}"
            )
        if not local.is_contiguous():
            raise ValueError("a PieceTensor's local piece must be contiguous (a view of a flat shard)")
        strides = tuple(math.prod(global_shape[d + 1 :]) for d in range(len(global_shape)))
        t = torch.Tensor._make_wrapper_subclass(
            cls, global_shape, strides=strides, dtype=local.dtype, device=local.device, requires_grad=False
        )
        t._local, t.info, t.block = local, info, block
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    # ------------------------------------------------------------------ the piece
    @property
    def start(self) -> int:
        return _range(self.info.start, self.info.end, self.block)[0]

    @property
    def end(self) -> int:
        return _range(self.info.start, self.info.end, self.block)[1]

    def range_of(self, rank: int) -> tuple[int, int]:
        """``[start, end)`` of the flattened global tensor that ``rank`` holds."""
        return _range(*self.info.range_of(rank), self.block)

    def to_local(self) -> torch.Tensor:
        """This rank's piece (a view of the shard, shaped like the sharded parameter or state)."""
        return self._local

    def full_tensor(self) -> torch.Tensor:
        """The whole tensor, on every rank: a collective over the unit's group (every rank must call it)."""
        world = self.info.world_size
        ranges = [self.range_of(r) for r in range(world)]
        width = max(hi - lo for lo, hi in ranges)
        padded = torch.zeros(width, dtype=self.dtype, device=self.device)
        padded[: self.end - self.start] = self._local.reshape(-1)
        gathered = torch.empty(world * width, dtype=self.dtype, device=self.device)
        comm.all_gather_blocking(gathered, padded, self.info.group)
        out = torch.empty(math.prod(self.shape), dtype=self.dtype, device=self.device)
        for r, (lo, hi) in enumerate(ranges):
            out[lo:hi] = gathered[r * width : r * width + hi - lo]
        return out.view(self.shape)

    def __repr__(self) -> str:  # type: ignore[override]
        return (
            f"PieceTensor(global_shape={list(self.shape)}, range=[{self.start}, {self.end}) of "
            f"{math.prod(self.shape)}, rank={self.info.rank} of {self.info.world_size}, dtype={self.dtype}, "
            f"local_shape={list(self._local.shape)})"
        )

    # ------------------------------------------------------------------ torch.distributed.checkpoint
    def _boxes(self) -> list[Box]:
        if math.prod(self.shape) == 0:  # an empty tensor: every rank writes the same empty chunk (DCP keeps one)
            return [((0,) * self.dim(), tuple(self.shape))]
        return boxes(tuple(self.shape), self.start, self.end)

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        properties = TensorProperties(dtype=self.dtype, layout=torch.strided, requires_grad=False,
                                      memory_format=torch.contiguous_format, pin_memory=False)  # fmt: skip
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                    properties=properties,
                    size=self.shape,
                ),
            )
            for offsets, sizes in self._boxes()
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in self._boxes()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        """The chunk at ``index.offset``: a view of the piece, shaped like the chunk (DCP reads and writes it)."""
        flat, lo = self._local.reshape(-1), 0
        for offsets, sizes in self._boxes():
            n = math.prod(sizes)
            if torch.Size(offsets) == index.offset:
                return _exact_storage(flat[lo : lo + n]).view(sizes)
            lo += n
        raise ValueError(f"{index.fqn!r}: this rank holds no chunk at offset {list(index.offset or ())}")

    # ------------------------------------------------------------------ what else may touch it
    def __reduce_ex__(self, protocol: int):
        # torch.save of a per-rank state dict stores the piece as a plain tensor (torch.load(weights_only) reads
        # it, and load_state_dict takes it back on the same rank and layout)
        if self.end - self.start != math.prod(self.shape):
            warnings.warn(
                f"pickling this rank's piece [{self.start}, {self.end}) of a {list(self.shape)} tensor as a plain "
                "tensor: a per-rank save, which loads back on this rank and layout only. For whole tensors use "
                "scalestack.full_state_dict(model); for checkpoints scalestack.checkpoint.save or "
                "torch.distributed.checkpoint",
                stacklevel=2,
            )
        return self._local.__reduce_ex__(protocol)

    def share_memory_(self) -> PieceTensor:
        raise RuntimeError("a PieceTensor has no storage of its own to share; share .to_local() (the piece)")

    def __deepcopy__(self, memo: dict) -> PieceTensor:
        return PieceTensor(self._local.clone(), self.info, self.block)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ON_THE_PIECE:  # detach, clone, .to(): the same global tensor with a new piece
            self = args[0]
            return PieceTensor(func(self._local, *args[1:], **kwargs), self.info, self.block)
        shapes = [list(a.shape) for a in args if isinstance(a, PieceTensor)]
        raise RuntimeError(  # not TypeError: Python turns that into "unsupported operand" for a + b
            f"{func} on a PieceTensor (this rank's piece of a sharded tensor of global shape "
            f"{shapes[0] if shapes else '?'}): compute on .to_local() (the piece) or .full_tensor() (the whole "
            "tensor, a collective); torch.distributed.checkpoint and load_state_dict take it as it is"
        )


_ON_THE_PIECE = {
    torch.ops.aten.detach.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.clone.default,
    torch.ops.aten._to_copy.default,
}


def _exact_storage(t: torch.Tensor) -> torch.Tensor:
    """``t``'s memory as a tensor whose storage is exactly its bytes (no copy). DCP's file writer copies a
    view of a larger storage before ``torch.save`` (which would write the whole storage), and torch 2.13's
    writer keeps every such copy until the file is closed: a save would cost a copy of the whole shard."""
    if t.device.type != "cpu" or t.numel() == 0 or t.untyped_storage().nbytes() == t.nbytes:
        return t
    return torch.from_numpy(t.detach().view(torch.uint8).numpy()).view(t.dtype)


def _range(start: int, end: int, block: int) -> tuple[int, int]:
    if start >= end:
        return (0, 0)
    return start // block, -(-end // block)


def _global_shape(info: ShardInfo, block: int) -> tuple[int, ...]:
    if block == 1:
        return tuple(info.global_shape)
    return (-(-math.prod(info.global_shape) // block),)
