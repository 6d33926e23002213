"""Muon on sharded parameters: momentum on the local pieces, Newton–Schulz on one owner per matrix.

``torch.optim.Muon``'s update, defaults and argument meanings, for 2-D parameters and 3-D expert stacks (a
batch of matrices, each orthogonalized on its own). Each step:

1. momentum on this rank's pieces, element-wise (nothing moves);
2. one ``all_to_all_single`` sends every piece to its matrix's owner (``muon_exchange.py``);
3. owners orthogonalize their matrices, batched by shape (fp32 by default, ``ns_dtype=torch.bfloat16`` as
   ``torch.optim.Muon`` does; the exchange then also travels in bf16);
4. one ``all_to_all_single`` returns each rank its part of the updates; weight decay and the update are
   applied to the pieces.

Two collectives per step for any number of matrices, and none when every matrix lies whole on one rank
(``fully_shard(..., granularity="matrix")``). Parameters that are not sharded (an unsharded model) are
orthogonalized where they are.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from ..fsdp import collectives as comm
from ..fsdp.param import is_sharded, shard_info
from .muon_exchange import ExchangePlan, Matrix, plan_exchange
from .newton_schulz import DEFAULT_COEFFICIENTS, check_ns_args, orthogonalize
from .state_checks import check_grad, check_not_dtensor, check_state_dict_form, param_name

_ADJUST_LR = (None, "original", "match_rms_adamw")


def adjusted_lr(lr: float, adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """``torch.optim.Muon``'s per-matrix learning rate: Keller Jordan's ``sqrt(max(1, rows / cols))`` or
    Moonshot's ``0.2 * sqrt(max(rows, cols))`` (which lets Muon reuse AdamW's learning rate)."""
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1.0, rows / cols))


def _global_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(shard_info(p).global_shape) if is_sharded(p) else tuple(p.shape)


def _check_hyperparameters(group: dict[str, Any]) -> None:
    for name in ("lr", "weight_decay", "momentum"):
        value = group[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
            raise ValueError(f"Muon: {name} must be a finite number >= 0, got {value!r}")
    check_ns_args(group["ns_coefficients"], group["ns_steps"], group["eps"])
    if group["adjust_lr_fn"] not in _ADJUST_LR:
        raise ValueError(
            f"Muon: adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {group['adjust_lr_fn']!r}"
        )


def _check_group(group: dict[str, Any]) -> None:
    _check_hyperparameters(group)
    for i, p in enumerate(group["params"]):
        check_not_dtensor("Muon", group, i, p)
        shape = _global_shape(p)
        if len(shape) not in (2, 3) or 0 in shape:
            raise ValueError(
                f"Muon: parameter {param_name(group, i, p)} has shape {list(shape)}; Muon optimizes matrices "
                "(2-D) and stacks of matrices (3-D, e.g. MoE experts). Give embeddings, the head, norms and "
                "biases to AdamW: scalestack.optim.muon_param_groups(model) splits a model's parameters"
            )
        if not p.is_floating_point():
            raise TypeError(f"Muon: parameter {param_name(group, i, p)} has dtype {p.dtype}; it optimizes floats")


class Muon(torch.optim.Optimizer):
    """Muon (``torch.optim.Muon``'s math) whose Newton–Schulz runs once per matrix, on its owner rank."""

    def __init__(self, params: Iterable, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = DEFAULT_COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None, *,
                 ns_dtype: torch.dtype = torch.float32) -> None:  # fmt: skip
        given = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_coefficients=ns_coefficients,
                     ns_steps=ns_steps, eps=eps, adjust_lr_fn=adjust_lr_fn)  # fmt: skip
        _check_hyperparameters(given)
        if ns_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise ValueError(f"Muon: ns_dtype must be a floating dtype such as torch.float32, got {ns_dtype!r}")
        self.ns_dtype = ns_dtype
        self._plan: _Plan | None = None
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn)  # fmt: skip
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            _check_group(self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()  # a refused group must not stay half-added
            raise
        self._plan = None  # the parameters changed: plan the exchange again at the next step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._plan is None:
            self._plan = _Plan(self.param_groups)
        plan = self._plan
        updates = [self._momentum(group) for group in self.param_groups]  # per group: update or None per param
        flat = [u for group_updates in updates for u in group_updates]
        orthogonal = plan.orthogonalize(flat, self.param_groups, self.ns_dtype)
        k = 0
        for group, group_updates in zip(self.param_groups, updates):
            n = len(group_updates)
            self._apply(group, group_updates, orthogonal[k : k + n])
            k += n
        return loss

    def _momentum(self, group: dict[str, Any]) -> list[torch.Tensor | None]:
        """Momentum on the local pieces; the tensor to orthogonalize per parameter (None: no gradient)."""
        params, grads, bufs = [], [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            check_grad("Muon", group, i, p)
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            params.append(p)
            grads.append(p.grad)
            bufs.append(state["momentum_buffer"])
        if bufs:
            torch._foreach_lerp_(bufs, grads, 1 - group["momentum"])
            if group["nesterov"]:
                bufs = torch._foreach_lerp(grads, bufs, group["momentum"])
        by_param = {id(p): u for p, u in zip(params, bufs)}
        return [by_param.get(id(p)) for p in group["params"]]

    def _apply(self, group: dict[str, Any], updates: list[torch.Tensor | None], orthogonal: list[torch.Tensor]):
        lr, wd = group["lr"], group["weight_decay"]
        params, steps, scales = [], [], []
        for p, u, o in zip(group["params"], updates, orthogonal):
            if u is None:
                continue
            rows, cols = _global_shape(p)[-2:]
            params.append(p)
            steps.append(o.view(p.shape).to(p.dtype))
            scales.append(-adjusted_lr(lr, group["adjust_lr_fn"], rows, cols))
        if params:
            torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_add_(params, torch._foreach_mul(steps, scales))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer's form; momentum shapes are checked before any change."""
        saved_groups, saved_state = check_state_dict_form(state_dict, self.param_groups)
        for group, saved in zip(self.param_groups, saved_groups):
            for i, (pid, p) in enumerate(zip(saved["params"], group["params"])):
                buf = (saved_state.get(pid) or {}).get("momentum_buffer")
                if buf is not None and tuple(buf.shape) != tuple(p.shape):
                    raise ValueError(
                        f"Muon.load_state_dict: momentum_buffer of parameter {param_name(group, i, p)} is "
                        f"{list(buf.shape)}, expected {list(p.shape)}; the state dict belongs to another model, "
                        "layout or world size"
                    )
        super().load_state_dict(state_dict)


class _Plan:
    """The step's fixed structure: which parameters are sharded, their matrices and the exchange plan."""

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        params = [(g, p) for g, group in enumerate(groups) for p in group["params"]]
        self.sharded = [k for k, (_, p) in enumerate(params) if is_sharded(p)]
        self.sharded_set = set(self.sharded)
        self.shapes = [_global_shape(p) for _, p in params]
        self.keys = [(shape[-2], shape[-1], g) for (g, _), shape in zip(params, self.shapes)]
        self.group = None
        self.exchange: ExchangePlan | None = None
        self.device = params[0][1].device if params else None
        if not self.sharded:
            return
        infos = [shard_info(params[k][1]) for k in self.sharded]
        self.group = infos[0].group
        if any(info.group is not self.group for info in infos):
            raise ValueError("Muon: the sharded parameters come from units with different process groups; give "
                             "each group of units its own optimizer")  # fmt: skip
        world, rank = infos[0].world_size, infos[0].rank
        matrices, ranges = [], []
        for local, (k, info) in enumerate(zip(self.sharded, infos)):
            rows, cols = self.shapes[k][-2:]
            for e in range(math.prod(self.shapes[k][:-2])):
                matrices.append(Matrix(local, e * rows * cols, rows, cols, self.keys[k]))
            ranges.append([info.range_of(r) for r in range(world)])
        _check_ranks_agree(matrices, ranges, self.group, world)
        self.exchange = plan_exchange(matrices, ranges, rank, world)
        self.piece_numel = [infos[i].numel for i in range(len(infos))]

    def orthogonalize(self, updates: list[torch.Tensor | None], groups: list[dict[str, Any]],
                      dtype: torch.dtype) -> list[torch.Tensor | None]:  # fmt: skip
        """The orthogonalized update of every parameter (this rank's piece), flattened; None where it had
        no gradient anywhere (zeros travel for it: the exchange's shape never changes)."""
        hyper = [(tuple(g["ns_coefficients"]), g["ns_steps"], g["eps"]) for g in groups]
        out: list[torch.Tensor | None] = [None] * len(updates)
        batches: list[tuple[object, torch.Tensor]] = []
        local = [k for k in range(len(updates)) if k not in self.sharded_set and updates[k] is not None]
        for k in local:
            rows, cols = self.shapes[k][-2:]
            batches.append((self.keys[k], updates[k].reshape(-1, rows, cols)))
        received = self._send_to_owners(updates, dtype) if self.exchange is not None else None
        if received is not None:
            batches += self._owned_batches(received)
        results = _orthogonalize_by_key(batches, hyper, dtype)
        for k, r in zip(local, results):
            out[k] = r.reshape(-1)
        if received is not None:
            pieces = self._send_back(results[len(local) :], dtype)
            for local_index, k in enumerate(self.sharded):
                if updates[k] is not None:
                    out[k] = pieces[local_index]
        return out

    def _send_to_owners(self, updates: list[torch.Tensor | None], dtype: torch.dtype) -> torch.Tensor:
        ex = self.exchange
        flat = []
        for k in self.sharded:
            u = updates[k]
            flat.append(u.reshape(-1) if u is not None else None)
        parts = [
            (flat[s.param][s.lo : s.hi] if flat[s.param] is not None else _zeros(s.hi - s.lo, dtype, self.device))
            for s in ex.send_segments
        ]
        send = _cat([t.to(dtype) for t in parts], dtype, self.device)
        return self._all_to_all(send, ex.recv_splits, ex.send_splits)

    def _owned_batches(self, received: torch.Tensor) -> list[tuple[object, torch.Tensor]]:
        ex = self.exchange
        parts = received.split(ex.recv_sizes)
        owned = _cat([parts[i] for i in ex.assemble], received.dtype, self.device)
        batches, offset = [], 0
        for key, count, rows, cols in ex.owned:
            n = count * rows * cols
            batches.append((key, owned[offset : offset + n].view(count, rows, cols)))
            offset += n
        return batches

    def _send_back(self, results: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        ex = self.exchange
        owned = _cat([r.reshape(-1).to(dtype) for r in results], dtype, self.device)
        parts = owned.split(ex.back_sizes)
        send = _cat([parts[i] for i in ex.back_order], dtype, self.device)
        received = self._all_to_all(send, ex.send_splits, ex.recv_splits)
        segments = received.split([s.hi - s.lo for s in ex.send_segments])
        mine = _cat([segments[i] for i in ex.local_order], dtype, self.device)
        return list(mine.split(self.piece_numel))

    def _all_to_all(self, send: torch.Tensor, recv_splits: list[int], send_splits: list[int]) -> torch.Tensor:
        if not self.exchange.needs_exchange:
            return send  # every part goes to this rank itself, in the order it would arrive
        recv = send.new_empty(sum(recv_splits))
        comm.all_to_all(recv, send, recv_splits, send_splits, self.group).wait()
        return recv


def _check_ranks_agree(matrices: list[Matrix], ranges: list, group, world: int) -> None:
    """Once, when the exchange is planned: ranks that gave Muon different parameters would exchange
    mismatched splits (a hang or wrong data), so compare a digest of what each rank planned."""
    digest = hashlib.sha256(repr((matrices, ranges)).encode()).hexdigest()
    everyone: list[str | None] = [None] * world
    dist.all_gather_object(everyone, digest, group=group)
    if len(set(everyone)) > 1:
        raise ValueError(
            "Muon: the ranks gave the optimizer different parameters (or differently sharded ones); build the "
            "optimizer from the same parameters, in the same order, on every rank"
        )


def _zeros(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(n, dtype=dtype, device=device)


def _cat(parts: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.cat`` that also takes no parts (a rank with nothing to send or own)."""
    return torch.cat(parts) if parts else _zeros(0, dtype, device)


def _orthogonalize_by_key(batches: list[tuple[object, torch.Tensor]], hyper: list[tuple], dtype: torch.dtype):
    """Orthogonalize every ``[k, m, n]`` batch, those with equal keys together; results in input order."""
    by_key: dict[object, list[int]] = {}
    for i, (key, _) in enumerate(batches):
        by_key.setdefault(key, []).append(i)
    results: list[torch.Tensor | None] = [None] * len(batches)
    for key, members in by_key.items():
        coefficients, steps, eps = hyper[key[2]]
        tensors = [batches[i][1] for i in members]
        stacked = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
        done = orthogonalize(stacked, coefficients, steps, eps, dtype)
        for i, part in zip(members, done.split([t.shape[0] for t in tensors])):
            results[i] = part
    return results
