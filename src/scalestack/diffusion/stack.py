"""A step cache around a transformer's block stack, as a wrapper, with the model unchanged.

``apply_step_cache(model, cache)`` hooks the model and its list of blocks: the model's forward pre-hook reads
the latent and the timestep of the call, the first block runs the whole stack (only on the rows the policy
computes, the others get h + their stored residual), and the other blocks pass their input through for that
call. Embeddings and the output head always run. This fits every model whose forward is
``embed -> for block in blocks: h = block(h, ...same arguments...) -> head`` and whose blocks return the
hidden states: our DiT, and diffusers' DiT / PixArt-style transformers (``apply_step_cache_diffusers``).

A new generation is detected by itself (the batch changes, or t goes back up) and ``reset_step_cache`` or a
call of ``sample`` starts one explicitly: no state outlives a generation, whatever its number of steps.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .step_cache import NoCache, StepCache, StepSignals

GUIDANCE_LAYOUTS = (None, "cond_first", "uncond_first")
ModulatedInput = Callable[[nn.Module, torch.Tensor, tuple, dict], torch.Tensor]


@dataclass
class CacheStats:
    """Counts of one generation (``last``) or of all since the cache was applied (``total``): calls of the
    model, and rows (samples x calls, both guidance branches) that ran the block stack or reused it."""

    calls: int = 0
    rows: int = 0
    computed_rows: int = 0
    decisions: list[torch.Tensor] = field(default_factory=list)  # per call: the bool (B,) of computed rows

    @property
    def evaluations(self) -> float:
        """Block-stack evaluations per sample: the calls a row actually computed, averaged over the rows."""
        return self.computed_rows / max(1, self.rows) * self.calls

    @property
    def compute_fraction(self) -> float:
        return self.computed_rows / max(1, self.rows)


class CachedStack:
    def __init__(self, model: nn.Module, blocks: nn.ModuleList, cache: StepCache, *, latent: str, time: str,
                 time_scale: float, guidance: str | None, modulated_input: ModulatedInput | None,
                 record: bool = False):  # fmt: skip
        self.model, self.blocks, self.cache = model, list(blocks), cache
        self.latent_name, self.time_name, self.time_scale = latent, time, time_scale
        self.guidance, self.modulated_input, self.record = guidance, modulated_input, record
        self.signature = inspect.signature(model.forward)
        for name in (latent, time):
            if name not in self.signature.parameters:
                raise ValueError(f"{type(model).__name__}.forward has no argument {name!r}: pass latent= and time= "
                                 f"naming its latent and timestep arguments")  # fmt: skip
        self.total, self.last = CacheStats(), CacheStats()
        self._call: tuple[torch.Tensor, torch.Tensor] | None = None
        self._passes = 0
        self.reset()
        self._handle = model.register_forward_pre_hook(self._read_call, with_kwargs=True)
        self._inside = False
        for i, block in enumerate(self.blocks):
            block.forward = self._wrap(i, type(block).forward.__get__(block))

    # -- state ---------------------------------------------------------------------------------------------
    def reset(self, expected_calls: int | None = None) -> None:
        """Start a new generation: no residual, no reference, fresh policy state, fresh ``last`` stats.
        ``expected_calls`` (the sampler's model calls, when it knows them) makes progress count calls, as the
        official caches do; without it, progress is read from t (a pipeline that announces nothing)."""
        if expected_calls is not None and (not isinstance(expected_calls, int) or expected_calls < 1):
            raise ValueError(f"expected_calls must be an int >= 1, got {expected_calls!r}")
        self.cache.reset()
        self.expected_calls = expected_calls
        self.residual: torch.Tensor | None = None
        self.calls, self.t_first, self.t_previous = 0, None, None
        self.last = CacheStats()
        self.recorded: list[dict[str, torch.Tensor]] = []

    def remove(self) -> None:
        """Take the hooks off: the model runs as before ``apply_step_cache``."""
        self._handle.remove()
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        self.model.__dict__.pop("_step_cache", None)

    # -- hooks ---------------------------------------------------------------------------------------------
    def _read_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self.signature.bind(*args, **kwargs).arguments
        latent, t = bound[self.latent_name], bound[self.time_name]
        t = torch.as_tensor(t, device=latent.device).float().reshape(-1) / self.time_scale
        if t.numel() not in (1, latent.shape[0]):
            raise ValueError(f"the {self.time_name!r} argument has {t.numel()} values for a batch of "
                             f"{latent.shape[0]}: pass one timestep, or one per row")  # fmt: skip
        self._call = latent, t.expand(latent.shape[0]) if t.numel() == 1 else t

    def _wrap(self, index: int, forward: Callable[..., Any]):
        def run(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self._inside:  # the stack running under the first block: each block as it is
                return forward(hidden, *args, **kwargs)
            if index == 0:
                return self._run_stack(hidden, *args, **kwargs)
            if self._passes > 0:  # the first block already ran the whole stack for this call
                self._passes -= 1
                return hidden
            return forward(hidden, *args, **kwargs)

        return run

    def _run_blocks(self, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        self._inside = True
        try:
            for block in self.blocks:
                out = block(hidden, *args, **kwargs)  # through the module's hooks, if it has any
                if not isinstance(out, torch.Tensor):
                    raise TypeError(
                        f"{type(block).__name__} returns {type(out).__name__}, not the hidden states: "
                        "step caches wrap stacks of blocks that return one tensor (DiT / PixArt style)"
                    )
                hidden = out
        finally:
            self._inside = False
        return hidden

    def _run_stack(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._call is None:
            raise RuntimeError("the block stack ran outside a call of the model the step cache was applied to")
        latent, t = self._call
        self._call = None
        b = hidden.shape[0]
        halves = self.guidance is not None
        if halves and b % 2:
            raise ValueError(f"guidance={self.guidance!r} needs an even batch ([cond; uncond] rows), got {b}")
        if (self.residual is not None and self.residual.shape != hidden.shape) or (
            self.t_previous is not None and bool((t > self.t_previous + 1e-6).any())
        ):
            self.reset()  # a new generation that nobody announced: another batch, or t went back up
        if self.expected_calls is not None and self.calls >= self.expected_calls:
            self.reset()  # more calls than announced: the sampler went on without a reset
        deciding = slice(0, b // 2) if self.guidance == "cond_first" else slice(b // 2, b) if halves else slice(0, b)
        if self.t_first is None:
            self.t_first = float(t.max())
        if self.expected_calls is not None:
            progress = self.calls / self.expected_calls
        else:
            progress = 0.0 if self.t_first <= 0 else (self.t_first - float(t[deciding].max())) / self.t_first
        modulated = None
        if self.cache.needs_modulated_input or self.record:
            modulated = self.modulated_input(self.blocks[0], hidden, args, kwargs)[deciding]
        last = self.expected_calls is not None and self.calls == self.expected_calls - 1
        signals = StepSignals(latent=latent[deciding], t=t[deciding], progress=progress, call=self.calls,
                              last=last, modulated=modulated)  # fmt: skip
        compute = self.cache.decide(signals)
        n = t[deciding].shape[0]
        if not isinstance(compute, torch.Tensor) or compute.dtype != torch.bool or compute.shape != (n,):
            is_tensor = isinstance(compute, torch.Tensor)
            got = f"{compute.dtype} {tuple(compute.shape)}" if is_tensor else type(compute).__name__
            raise TypeError(f"{type(self.cache).__name__}.decide must return a bool tensor of shape ({n},), got {got}")
        compute = compute.to(hidden.device)
        if self.residual is None:
            compute = torch.ones_like(compute)
        if halves:
            compute = torch.cat([compute, compute])  # the conditional branch decides for both
        if bool(compute.all()):
            out = self._run_blocks(hidden, args, kwargs)  # the same call as without a cache: bitwise
        else:
            out = hidden + self.residual
            if bool(compute.any()):
                rows = compute.nonzero().squeeze(1)
                sub = self._run_blocks(hidden[rows], _rows_of(args, rows, b), _rows_of(kwargs, rows, b))
                out = out.index_copy(0, rows, sub)
        residual = out - hidden
        if self.residual is None:
            self.residual = residual
        else:
            self.residual = torch.where(compute.view(-1, *([1] * (hidden.dim() - 1))), residual, self.residual)
        if self.record:
            self.recorded.append({"t": t[deciding].clone(), "modulated": modulated.clone(),
                                  "residual": residual[deciding].clone()})  # fmt: skip
        self.calls += 1
        self.t_previous = t
        for stats in (self.last, self.total):
            stats.calls += 1
            stats.rows += b
            stats.computed_rows += int(compute.sum())
        self.last.decisions.append(compute.cpu())
        self._passes = len(self.blocks) - 1
        return out


def _rows_of(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """The block arguments for a subset of rows: every tensor whose first dimension is the batch, also inside
    tuples, lists and dicts. (A per-token table whose length happens to equal the batch would be cut too:
    such a model needs ``blocks`` whose batch arguments are unambiguous.)"""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows) if value.dim() and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_rows_of(v, rows, batch) for v in value)
    if isinstance(value, dict):
        return {k: _rows_of(v, rows, batch) for k, v in value.items()}
    return value


def _blocks_of(model: nn.Module, blocks: nn.ModuleList | None, names: tuple[str, ...]) -> nn.ModuleList:
    if blocks is None:
        blocks = next((getattr(model, n) for n in names if isinstance(getattr(model, n, None), nn.ModuleList)), None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"no block stack found on {type(model).__name__}: pass blocks=model.<its ModuleList of "
                         f"blocks> (looked for {', '.join(names)})")  # fmt: skip
    return blocks


def _dit_modulated_input(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    if hasattr(block, "modulated_input"):
        return block.modulated_input(hidden, *args, **kwargs)
    return hidden


def apply_step_cache(model: nn.Module, cache: StepCache | None = None, *, blocks: nn.ModuleList | None = None,
                     latent: str = "x", time: str = "t", time_scale: float = 1.0, guidance: str | None = "cond_first",
                     modulated_input: ModulatedInput | None = None, record: bool = False) -> CachedStack:  # fmt: skip
    """Wrap ``model``'s block stack (``blocks``, else ``model.blocks`` / ``transformer_blocks``) with ``cache``.

    latent, time: the names of the forward's latent and timestep arguments (t / time_scale is flow time in
    [0, 1], 1 = noise); guidance: the batch layout under classifier-free guidance, "cond_first" (ours),
    "uncond_first" (diffusers pipelines) or None (every row decides alone). Returns the ``CachedStack``,
    whose ``last`` and ``total`` stats count calls and computed rows; ``remove()`` takes it off."""
    if guidance not in GUIDANCE_LAYOUTS:
        raise ValueError(f"guidance must be one of {GUIDANCE_LAYOUTS}, got {guidance!r}")
    if cache is not None and not isinstance(cache, StepCache):
        raise TypeError(f"cache must be a StepCache (NoCache, FixedInterval, TeaCache, MagCache, SenCache), got "
                        f"{type(cache).__name__}")  # fmt: skip
    if time_scale <= 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    if getattr(model, "_step_cache", None) is not None:
        raise ValueError(f"{type(model).__name__} already has a step cache: call .remove() on it first")
    stack = CachedStack(model, _blocks_of(model, blocks, ("blocks", "transformer_blocks")), cache or NoCache(),
                        latent=latent, time=time, time_scale=time_scale, guidance=guidance,
                        modulated_input=modulated_input or _dit_modulated_input, record=record)  # fmt: skip
    model._step_cache = stack
    return stack


def _diffusers_modulated_input(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """BasicTransformerBlock's adaLN-Zero input (DiT); the stack's input for other norms."""
    if getattr(block, "norm_type", None) == "ada_norm_zero":
        return block.norm1(hidden, kwargs.get("timestep"), kwargs.get("class_labels"), hidden_dtype=hidden.dtype)[0]
    return hidden


def apply_step_cache_diffusers(transformer: nn.Module, cache: StepCache | None = None, *, guidance: str | None,
                               record: bool = False) -> CachedStack:  # fmt: skip
    """``apply_step_cache`` for a diffusers transformer (``DiTTransformer2DModel``, ``PixArtTransformer2DModel``,
    ...): its ``transformer_blocks``, latent ``hidden_states``, ``timestep`` in 0..1000. ``guidance`` must be
    said, because diffusers' pipelines differ: ``DiTPipeline`` batches "cond_first", PixArt and most text-to-image
    pipelines "uncond_first" (the negative prompt first); None when the pipeline runs without guidance."""
    return apply_step_cache(transformer, cache, blocks=_blocks_of(transformer, None, ("transformer_blocks",)),
                            latent="hidden_states", time="timestep", time_scale=1000.0, guidance=guidance,
                            modulated_input=_diffusers_modulated_input, record=record)  # fmt: skip


def reset_step_cache(model: Any, expected_calls: int | None = None) -> None:
    """Start a new generation on the step cache applied to ``model``, if any (``CachedStack.reset``)."""
    stack = getattr(model, "_step_cache", None)
    if stack is not None:
        stack.reset(expected_calls)
