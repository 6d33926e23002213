"""AdamW with block-wise 8-bit moments whose blocks are blocks of the *global* tensor.

Blocks are ``block_size`` consecutive elements of a parameter's flattened global tensor (its last block may
be shorter). Sharded with ``fully_shard(..., granularity=AdamW8bit.granularity(block_size))``, every rank's
piece starts on a block boundary, so each rank quantizes whole blocks of its own piece: no scale is ever
exchanged, and the codes and scales are the same bytes whatever the world size (torchao's AdamW8bit picks
8-bit or fp32 state from the local shard size instead, pytorch/ao#4912).

A param group's moments live in two ``[R, B]`` uint8 code arrays and two ``[R]`` fp32 scale arrays; each
parameter owns whole rows (its last row padded). ``opt.state[p]`` holds views of them, shaped like the
global tensor's piece (``exp_avg_codes`` like ``p``, ``exp_avg_scales`` like its blocks), so a checkpoint
can store them as pieces of global tensors. The step packs the gradients of a group (one fp32 copy, zero
padded to whole rows) and runs over its rows in chunks, so dequantized moments stay a few MiB.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

import torch

from ..fsdp.param import is_sharded, shard_info
from ..planner.granularity import ElementBlocks
from .quantization import dequantize, quantize
from .state_checks import check_grad, check_not_dtensor, check_state_dict_form, param_name

_CHUNK_ELEMENTS = 1 << 20  # rows processed together: the moments are dequantized a few MiB at a time
STATE_KEYS = ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales")


class _BlockState:
    """One param group's moments: parameter i owns rows ``[first_row[i], first_row[i] + rows[i])``."""

    def __init__(self, params: list[torch.Tensor], block_size: int) -> None:
        B = block_size
        devices = sorted({str(p.device) for p in params})
        if len(devices) > 1:
            raise ValueError(f"AdamW8bit: one param group's parameters are on {devices}; one group per device")
        self.block_size = B
        self.rows = [-(-p.numel() // B) for p in params]
        self.first_row = [0, *itertools.accumulate(self.rows)][:-1]
        R = sum(self.rows)
        device = params[0].device if params else torch.device("cpu")
        self.m_codes = torch.zeros(R, B, dtype=torch.uint8, device=device)
        self.v_codes = torch.zeros(R, B, dtype=torch.uint8, device=device)
        self.m_scales = torch.zeros(R, dtype=torch.float32, device=device)
        self.v_scales = torch.zeros(R, dtype=torch.float32, device=device)
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=device)
        counts = torch.tensor(self.rows, dtype=torch.long)
        self.row_owner = torch.repeat_interleave(torch.arange(len(params)), counts).to(device)

    def views(self, i: int, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """``opt.state[p]``: views of the group's arrays, shaped like p's piece and p's blocks."""
        a, b = self.first_row[i], self.first_row[i] + self.rows[i]
        n = p.numel()
        return {
            "step": self.steps[i],
            "exp_avg_codes": self.m_codes[a:b].view(-1)[:n].view(p.shape),
            "exp_avg_scales": self.m_scales[a:b],
            "exp_avg_sq_codes": self.v_codes[a:b].view(-1)[:n].view(p.shape),
            "exp_avg_sq_scales": self.v_scales[a:b],
        }


class AdamW8bit(torch.optim.Optimizer):
    """AdamW (``torch.optim.AdamW``'s update and defaults) with 8-bit block-wise quantized moments.

    Both moments are kept as 8-bit codes plus one fp32 scale per block of ``block_size`` elements of the
    global flattened tensor: about 2 bytes per parameter plus ``8 / block_size``. Each step dequantizes,
    applies AdamW in fp32 and quantizes again; the update uses the fp32 moments of this step.
    Works on sharded pieces (a layout that cuts a block raises) and on plain tensors.
    """

    # states with one value per block_size elements of the global tensor (checkpoints shard them by blocks)
    block_state_keys = ("exp_avg_scales", "exp_avg_sq_scales")

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, block_size: int = 256) -> None:  # fmt: skip
        _check_hyperparameters(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, block_size=block_size))
        self._blocks: list[_BlockState] = []
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, block_size=block_size)
        super().__init__(params, defaults)

    @staticmethod
    def granularity(block_size: int = 256) -> ElementBlocks:
        """The ``fully_shard`` granularity under which no rank boundary cuts a quantization block."""
        _check_block_size(block_size)
        return ElementBlocks(block_size)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_hyperparameters(group)
            _check_params(group)
        except (TypeError, ValueError):
            self.param_groups.pop()  # a refused group must not stay half-added
            raise
        blocks = _BlockState(group["params"], group["block_size"])
        self._blocks.append(blocks)
        for i, p in enumerate(group["params"]):
            self.state[p] = blocks.views(i, p)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, blocks in zip(self.param_groups, self._blocks):
            self._step_group(group, blocks)
        return loss

    def _step_group(self, group: dict[str, Any], blocks: _BlockState) -> None:
        params = group["params"]
        active = [p.grad is not None for p in params]
        if not any(active):
            return
        for i, p in enumerate(params):
            if active[i]:
                check_grad("AdamW8bit", group, i, p)
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        mask = torch.tensor(active, device=blocks.steps.device)
        blocks.steps += mask.float()
        steps = blocks.steps.double()
        step_size = (lr / (1 - torch.pow(beta1, steps))).float()
        bc2_sqrt = (1 - torch.pow(beta2, steps)).sqrt().float()
        for lo, hi in _runs(active):  # one run when every parameter has a gradient
            run = params[lo:hi]
            update = _pack_grads(run, blocks.rows[lo:hi], blocks.block_size)
            r0 = blocks.first_row[lo]
            _adamw_rows(blocks, update, r0, step_size, bc2_sqrt, beta1, beta2, eps)
            torch._foreach_mul_(run, 1 - lr * wd)
            torch._foreach_add_(run, _unpack(update, run, blocks.rows[lo:hi], blocks.block_size))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer's form; shapes and block sizes are checked before any change."""
        saved_groups, saved_state = check_state_dict_form(state_dict, self.param_groups)
        incoming: list[tuple[int, int, torch.Tensor, dict[str, torch.Tensor] | None]] = []
        for g, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if saved.get("block_size") != group["block_size"]:
                raise ValueError(
                    f"AdamW8bit.load_state_dict: param group {g} was saved with block_size {saved.get('block_size')} "
                    f"and this optimizer uses {group['block_size']}; construct it with the saved block size"
                )
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                entry = saved_state.get(pid)
                if entry is not None:
                    _check_entry(entry, group, i, p)
                incoming.append((g, i, p, entry))
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        for g, i, p, entry in incoming:
            target = self._blocks[g].views(i, p)
            if entry is None:
                for t in target.values():
                    t.zero_()
            else:
                for key, t in target.items():
                    t.copy_(entry[key])
            self.state[p] = target


def _check_hyperparameters(group: dict[str, Any]) -> None:
    for name in ("lr", "eps", "weight_decay"):
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
            raise ValueError(f"AdamW8bit: {name} must be a finite number >= 0, got {value!r}")
    betas = group["betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"AdamW8bit: betas must be two numbers in [0, 1), got {betas!r}")
    _check_block_size(group["block_size"])


def _check_block_size(block_size: object) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"AdamW8bit: block_size must be a positive int, got {block_size!r}")


def _check_params(group: dict[str, Any]) -> None:
    B = group["block_size"]
    for i, p in enumerate(group["params"]):
        check_not_dtensor("AdamW8bit", group, i, p)
        if not p.is_floating_point() or p.is_complex():
            name = param_name(group, i, p)
            raise TypeError(f"AdamW8bit: parameter {name} has dtype {p.dtype}; it optimizes real floats")
        if not is_sharded(p):
            continue
        info = shard_info(p)
        numel = math.prod(info.global_shape)
        for r in range(info.world_size):  # every rank checks every rank's piece: all of them raise, none hangs
            start, end = info.range_of(r)
            if end > start and (start % B or (end % B and end != numel)):
                raise ValueError(
                    f"AdamW8bit: parameter {param_name(group, i, p)}: rank {r} holds elements [{start}, {end}) of "
                    f"its {list(info.global_shape)} tensor, which cuts a {B}-element quantization block at a rank "
                    f"boundary; shard its unit with fully_shard(..., granularity=AdamW8bit.granularity({B}))"
                )


def _runs(active: list[bool]) -> list[tuple[int, int]]:
    """Maximal ranges of consecutive parameters that have a gradient."""
    runs, start = [], None
    for i, a in enumerate([*active, False]):
        if a and start is None:
            start = i
        elif not a and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _pack_grads(params: list[torch.Tensor], rows: list[int], B: int) -> torch.Tensor:
    """The run's gradients as one fp32 ``[sum(rows) * B]`` tensor, each padded with zeros to whole rows."""
    zeros = torch.zeros(B, dtype=torch.float32, device=params[0].device)
    parts: list[torch.Tensor] = []
    for p, r in zip(params, rows):
        parts.append(p.grad.reshape(-1).float())
        parts.append(zeros[: r * B - p.numel()])
    return torch.cat(parts)


def _unpack(flat: torch.Tensor, params: list[torch.Tensor], rows: list[int], B: int) -> list[torch.Tensor]:
    """Each parameter's part of a packed ``[sum(rows) * B]`` tensor, shaped and typed like the parameter."""
    sizes = [r * B for r in rows]
    return [part[: p.numel()].view(p.shape).to(p.dtype) for part, p in zip(flat.split(sizes), params)]


def _adamw_rows(blocks: _BlockState, flat: torch.Tensor, r0: int, step_size: torch.Tensor, bc2_sqrt: torch.Tensor,
                beta1: float, beta2: float, eps: float) -> None:  # fmt: skip
    """AdamW on rows ``[r0, r0 + len(flat) / B)``: ``flat`` holds their gradients and gets their updates.

    Only correctly rounded operations (no lerp, addcmul or fused multiply-add), so each element's result is
    independent of where it sits in the tensor: bitwise the same at every world size.
    """
    B = blocks.block_size
    grads = flat.view(-1, B)
    chunk = max(_CHUNK_ELEMENTS // B, 1)
    for c0 in range(0, grads.shape[0], chunk):
        g = grads[c0 : c0 + chunk]
        rows = slice(r0 + c0, r0 + c0 + g.shape[0])
        owner = blocks.row_owner[rows]
        m = dequantize(blocks.m_codes[rows], blocks.m_scales[rows], "signed")
        v = dequantize(blocks.v_codes[rows], blocks.v_scales[rows], "unsigned_nonzero")
        m.mul_(beta1).add_(g * (1 - beta1))
        v.mul_(beta2).add_(g * g * (1 - beta2))
        denom = v.sqrt().div_(bc2_sqrt[owner][:, None]).add_(eps)
        g.copy_(m.div(denom).mul_(-step_size[owner][:, None]))
        blocks.m_codes[rows], blocks.m_scales[rows] = quantize(m, "signed")
        blocks.v_codes[rows], blocks.v_scales[rows] = quantize(v, "unsigned_nonzero")


def _check_entry(entry: dict[str, Any], group: dict[str, Any], i: int, p: torch.Tensor) -> None:
    name = param_name(group, i, p)
    missing = [k for k in ("step", *STATE_KEYS) if k not in entry]
    if missing:
        raise ValueError(f"AdamW8bit.load_state_dict: the state of parameter {name} lacks {missing}; "
                         "was it saved by another optimizer?")  # fmt: skip
    rows = (-(-p.numel() // group["block_size"]),)
    for key, shape in (("exp_avg_codes", p.shape), ("exp_avg_sq_codes", p.shape),
                       ("exp_avg_scales", rows), ("exp_avg_sq_scales", rows)):  # fmt: skip
        t = entry[key]
        dtype = torch.uint8 if key.endswith("codes") else torch.float32
        if isinstance(t, torch.Tensor) and t.dtype != dtype:
            raise ValueError(f"AdamW8bit.load_state_dict: {key} of parameter {name} is {t.dtype}, expected {dtype}")
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"AdamW8bit.load_state_dict: {key} of parameter {name} is {got}, expected {list(shape)}; "
                "the state dict belongs to another model, layout or world size"
            )
