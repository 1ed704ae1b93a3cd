"""Launch tracer: every device launch of a forward step, recorded on CPU without a GPU.

Capturing a decode step in a CUDA graph needs a step that issues the same launches, with the same
shapes, scalar arguments, grids and addresses, every time, and never reads a value back. That is a
property of the host code, so it can be checked here: `LaunchTracer` runs the CUDA code path on CPU
tensors (caches built with ``kernels="triton"``) and records, per launch, a `Launch`:

* Triton kernels: ``JITFunction.run`` (compiled) and ``InterpretedFunction.run`` (TRITON_INTERPRET=1),
  the methods ``kernel[grid](...)`` calls, are replaced while tracing: the launch is recorded (kernel,
  grid, tensor arguments' shapes, dtypes and addresses, scalar arguments, constexprs) and NOT run, so
  its outputs keep whatever they held. Kernels behind ``triton.autotune`` would be recorded once per
  benchmarked config (xq's kernels do not autotune). While tracing, ``backend="auto"`` of the kernel
  wrappers (``xqcli.kernels._triton.use_triton``) picks Triton as it would for CUDA tensors
  (``auto_backend="triton"``, the default; ``"ref"`` keeps the CPU choice, the pure-torch reference).
* aten ops: a `TorchDispatchMode` sees each op. Ops with a CompositeImplicitAutograd kernel
  (``linear``, ``reshape``, ``to``, ``scaled_dot_product_attention``, ...) are decomposed first, as
  FakeTensorMode does, so what is counted is the backend ops that launch kernels (under
  ``torch.inference_mode`` the mode would otherwise see ``linear`` where CUDA runs ``mm``). An op is
  a launch unless it is metadata only, by this rule:
  1. it writes nothing (no ``(a!)`` argument) and every tensor it returns shares storage with one of
     its inputs: views (``view``, ``slice``, ``select``, ``transpose``, ``expand``, ``as_strided``,
     ...) and no-op conversions; or
  2. it is in `METADATA_OPS`: allocations (``empty*``, ``new_empty*``: no kernel on CUDA),
     ``_unsafe_view`` (a view that claims a fresh tensor), ``detach``/``detach_``, ``alias``,
     ``lift_fresh`` (autograd/bookkeeping only).
  CPU-only choices remain in what is counted: SDPA decomposes into its CPU flash op (one op, as the
  CUDA flash/efficient kernels are one launch each) after the device-independent bool-mask
  conversion; a host-to-device copy (``tensor.to("cuda")``) is a no-op on CPU and is not seen (the
  host-read spy records the ``torch.tensor`` it starts from).
* Host reads: ``aten._local_scalar_dense`` (``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``), ops
  whose output size depends on values (`DATA_DEPENDENT_OPS`: a CUDA sync each), and, from xq's own
  code, the Python-level ``Tensor.tolist`` and friends plus ``torch.tensor`` (`spy_read_backs`:
  ``tolist`` of a CPU tensor never reaches the dispatcher).

Addresses: each tensor is recorded with its ``data_ptr()`` and whether its storage was allocated inside
the traced region (``local``). `LaunchTracer.signature` compares steps in one of two ways:
``addresses="all"`` compares every address; ``addresses="persistent"`` compares the addresses of
tensors that existed before the step (weights, cache buffers, lengths) and only the shapes of the
step's own temporaries. On CUDA a captured graph allocates its temporaries from its private pool, the
same addresses at every replay, so only the persistent ones can move; on CPU malloc gives temporaries
different addresses from run to run, so "all" is exact only where the allocator happens to repeat.

Layer attribution: `mark_layers` hooks a model's ``input_layernorm`` modules and its final norm, so
each launch carries its section: ``before`` (embedding, step bookkeeping), ``layer i``, ``after``
(final norm, lm_head; ``cache.end()`` runs before the final norm and counts in the last layer).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import xqcli
import xqcli.kernels
from xqcli.kernels import _triton

__all__ = ["DATA_DEPENDENT_OPS", "METADATA_OPS", "HostRead", "Launch", "LaunchKey", "LaunchTracer", "StepTrace",
           "differences", "mark_layers", "spy_read_backs", "trace_step", "trace_steps"]

METADATA_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                          "_unsafe_view", "detach", "detach_", "alias", "lift_fresh"})
DATA_DEPENDENT_OPS = frozenset({"nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
                                "unique_consecutive", "unique_dim_consecutive"})
READ_BACKS = ("tolist", "item", "__int__", "__float__", "__bool__", "__index__")
_OURS = (str(Path(xqcli.__file__).parent), str(Path(xqcli.kernels.__path__[0]).resolve()))
_SPY_DEPTH = [0]  # > 0 while a recorded read-back runs: its aten._local_scalar_dense is the same read


class HostRead(NamedTuple):
    """A read-back of a tensor's values (or a `torch.tensor` of host data): what, in which function, where."""

    what: str
    function: str
    where: str  # file:line


@dataclass(frozen=True)
class Launch:
    """One device launch. Tensors (inputs, then an aten op's outputs) are described position by position."""

    kind: str  # "aten" | "triton"
    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    ptrs: tuple[int, ...]  # data_ptr() of each tensor
    local: tuple[bool, ...]  # whether that tensor's storage was allocated inside the traced region
    scalars: tuple  # non-tensor arguments: aten in order, Triton as (name, value)
    constexprs: tuple = ()  # Triton: (name, value) of tl.constexpr parameters
    grid: tuple | None = None  # Triton
    section: str = "before"

    def key(self, addresses: str = "persistent") -> LaunchKey:
        """What must be equal between two steps for one graph to replay both (see the module docstring)."""
        if addresses not in ("all", "persistent"):
            raise ValueError(f"addresses must be 'all' or 'persistent', got {addresses!r}")
        ptrs = self.ptrs if addresses == "all" else tuple(None if loc else p for p, loc in zip(self.ptrs, self.local))
        return LaunchKey(self.kind, self.name, self.shapes, self.dtypes, ptrs, self.scalars, self.constexprs, self.grid)


class LaunchKey(NamedTuple):
    """A launch as the step signature holds it (hashable; `differences` names the fields that differ)."""

    kind: str
    name: str
    shapes: tuple
    dtypes: tuple
    ptrs: tuple
    scalars: tuple
    constexprs: tuple
    grid: tuple | None


def _plain(value: Any) -> Any:
    """A hashable, comparable stand-in for a non-tensor argument (floats by repr: NaN equals itself)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return repr(value)


def _caller() -> tuple[str, str]:
    """(function, file:line) of the innermost frame outside torch and this module."""
    here = __file__
    f = sys._getframe(1)
    while f is not None:
        name = f.f_code.co_filename
        if name != here and "/torch/" not in name:
            return f.f_code.co_name, f"{name}:{f.f_lineno}"
        f = f.f_back
    return "?", "?"


@contextmanager
def spy_read_backs() -> Iterator[list[HostRead]]:
    """Record every read-back of a tensor's values made by xq's own code (not torch's or Triton's).

    On a GPU each one waits for all queued work; ``torch.tensor(host data)`` is the other direction, a
    copy to the device (recorded too: it waits as well unless pinned and non-blocking). While a
    recorded read runs, `_SPY_DEPTH` is raised, so the tracer does not count its aten read again."""
    seen: list[HostRead] = []
    originals = {name: getattr(torch.Tensor, name) for name in READ_BACKS}
    orig_tensor = torch.tensor

    def spy(name: str, orig: Callable) -> Callable:
        def wrapped(*a, **k):
            f = sys._getframe(1)
            if not f.f_code.co_filename.startswith(_OURS):
                return orig(*a, **k)
            seen.append(HostRead(name, f.f_code.co_name, f"{f.f_code.co_filename}:{f.f_lineno}"))
            _SPY_DEPTH[0] += 1
            try:
                return orig(*a, **k)
            finally:
                _SPY_DEPTH[0] -= 1
        return wrapped

    for name, orig in originals.items():
        setattr(torch.Tensor, name, spy(name, orig))
    torch.tensor = spy("torch.tensor", orig_tensor)
    try:
        yield seen
    finally:
        for name, orig in originals.items():
            setattr(torch.Tensor, name, orig)
        torch.tensor = orig_tensor


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _triton_classes() -> list[type]:
    """The classes whose `run` a `kernel[grid](...)` launch calls, in the installed Triton."""
    if not _triton.HAS_TRITON:
        return []
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return [JITFunction, InterpretedFunction]


class _AtenMode(TorchDispatchMode):
    """The tracer's dispatch mode. Kept apart from `LaunchTracer`: a mode is re-entered for every
    decomposition, and the tracer's own enter/exit (the patches) must run once."""

    def __init__(self, tracer: LaunchTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        self.tracer._record_aten(func, args, kwargs, out)
        return out


class LaunchTracer:
    """Records the launches and host reads of the code run inside ``with LaunchTracer() as tr:``.

    `launches` in order, `host_reads`; `signature()` to compare steps, `count_by_kind()`, `per_layer()`,
    `by_section()`. Triton kernels are not run (see the module docstring)."""

    def __init__(self, auto_backend: str = "triton") -> None:
        if auto_backend not in ("triton", "ref"):
            raise ValueError(f"auto_backend must be 'triton' or 'ref', got {auto_backend!r}")
        self.auto_backend = auto_backend
        self.launches: list[Launch] = []
        self.host_reads: list[HostRead] = []
        self.section = "before"
        self._born: set[int] = set()  # storages allocated inside the traced region
        self._stack = ExitStack()

    # --- entering and leaving: patch Triton's launch entry and the kernels' backend choice ----------
    def __enter__(self) -> LaunchTracer:  # noqa: PYI034 (not subclassed)
        with ExitStack() as stack:
            for cls in _triton_classes():
                stack.callback(setattr, cls, "run", cls.__dict__["run"])
                cls.run = self._record_triton
            if self.auto_backend == "triton" and _triton.HAS_TRITON:
                self._patch_use_triton(stack)
            self.host_reads = stack.enter_context(spy_read_backs())
            stack.enter_context(_AtenMode(self))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _patch_use_triton(self, stack: ExitStack) -> None:
        """`backend="auto"` picks Triton (as for CUDA tensors) in every kernel module; on leaving, every
        module holding the stand-in gets the original back, those first imported while tracing too."""
        orig = _triton.use_triton

        def use_triton(op: str, backend: str, *tensors: torch.Tensor | None) -> bool:
            return True if backend in ("auto", "triton") else orig(op, backend, *tensors)

        def kernel_modules(holding: Callable) -> list:
            return [mod for name, mod in list(sys.modules.items())
                    if name.split(".")[:2] == ["xqcli", "kernels"] and getattr(mod, "use_triton", None) is holding]

        for mod in kernel_modules(orig):
            mod.use_triton = use_triton
        stack.callback(lambda: [setattr(mod, "use_triton", orig) for mod in kernel_modules(use_triton)])

    def mark(self, section: str) -> None:
        """Attribute the launches from now on to `section` (see `mark_layers`)."""
        self.section = section

    # --- recording -----------------------------------------------------------------------------
    def _tensors(self, ts: list[torch.Tensor]) -> tuple[tuple, tuple, tuple, tuple]:
        return (tuple(tuple(t.shape) for t in ts), tuple(str(t.dtype).removeprefix("torch.") for t in ts),
                tuple(t.data_ptr() for t in ts), tuple(_storage(t) in self._born for t in ts))

    @property
    def _record_triton(self) -> Callable:
        """The stand-in for Triton's `run` while this tracer is active: records the launch, runs nothing."""

        def run(kernel, *args, grid, warmup, **kwargs) -> None:
            if warmup:
                return
            fn = kernel.fn
            bound = dict(zip(kernel.arg_names, args)) | kwargs
            annotations = fn.__annotations__  # strings under `from __future__ import annotations`
            tensors, scalars, constexprs = [], [], []
            for name, value in bound.items():
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
                elif "constexpr" in str(annotations.get(name, "")):
                    constexprs.append((name, _plain(value)))
                else:  # scalar arguments, and launch options (num_warps, ...)
                    scalars.append((name, _plain(value)))
            g = grid(bound) if callable(grid) else grid
            g = tuple(int(x) for x in (g if isinstance(g, (tuple, list)) else (g,)))
            shapes, dtypes, ptrs, local = self._tensors(tensors)
            self.launches.append(Launch("triton", fn.__name__, shapes, dtypes, ptrs, local, tuple(scalars),
                                        tuple(constexprs), g, self.section))

        return run

    def _record_aten(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        """Record one backend op that ran (a launch unless metadata only; a host read)."""
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            if _SPY_DEPTH[0] == 0:
                self.host_reads.append(HostRead("aten._local_scalar_dense", *_caller()))
            return
        leaves = tree_leaves((args, kwargs))
        ins = [t for t in leaves if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        in_storages = {_storage(t) for t in ins}
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        fresh = [t for t in outs if _storage(t) not in in_storages]
        self._born.update(_storage(t) for t in fresh)
        if name in DATA_DEPENDENT_OPS:
            self.host_reads.append(HostRead(f"aten.{name} (output size read back)", *_caller()))
        if name in METADATA_OPS or (not writes and outs and not fresh):
            return
        shapes, dtypes, ptrs, local = self._tensors(ins + outs)
        scalars = tuple(_plain(v) for v in leaves if not isinstance(v, torch.Tensor))
        self.launches.append(Launch("aten", str(func), shapes, dtypes, ptrs, local, scalars, section=self.section))

    # --- reading the trace ---------------------------------------------------------------------
    def signature(self, addresses: str = "persistent") -> tuple[LaunchKey, ...]:
        return tuple(launch.key(addresses) for launch in self.launches)

    def count_by_kind(self) -> dict[str, int]:
        c = Counter(launch.kind for launch in self.launches)
        return {"aten": c["aten"], "triton": c["triton"]}

    def by_section(self) -> dict[str, int]:
        """Launches per section, in order of first appearance."""
        return dict(Counter(launch.section for launch in self.launches))

    def per_layer(self, n_layers: int) -> float:
        """All launches of the step over the layer count (the issue's "per layer" column)."""
        return len(self.launches) / n_layers


@contextmanager
def mark_layers(model: torch.nn.Module, tracer: LaunchTracer) -> Iterator[None]:
    """Sections for `tracer`: ``layer i`` from layer i's input norm on, ``after`` from the final norm on."""
    hooks = [layer.input_layernorm.register_forward_pre_hook(lambda *_, i=i: tracer.mark(f"layer {i}"))
             for i, layer in enumerate(model.layers)]
    hooks.append(model.model.norm.register_forward_pre_hook(lambda *_: tracer.mark("after")))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@dataclass(frozen=True)
class StepTrace:
    """One traced decode step: its signature (see `LaunchTracer.signature`), host reads and counts."""

    signature: tuple[LaunchKey, ...]
    host_reads: tuple[HostRead, ...]
    counts: dict[str, int]  # {"aten": n, "triton": m}
    sections: dict[str, int]  # launches per section (`mark_layers`)


def trace_step(model: torch.nn.Module, cache, tokens: torch.Tensor, n_new: list[int] | None = None, *,
               auto_backend: str = "triton") -> LaunchTracer:
    """One forward step of `tokens` through `model` and `cache`, traced with layer sections."""
    with LaunchTracer(auto_backend) as tr, mark_layers(model, tr):
        model(tokens, cache, n_new)
    return tr


def trace_steps(model: torch.nn.Module, cache, n_steps: int, batch_lengths: list[int], *,
                addresses: str = "persistent", auto_backend: str = "triton", seed: int = 0) -> list[StepTrace]:
    """Prefill an empty `cache` with random prompts of `batch_lengths` tokens (one per row, untraced),
    then trace `n_steps` decode steps of one random token per row. A static step gives equal signatures."""
    if len(batch_lengths) != cache.batch:
        raise ValueError(f"{len(batch_lengths)} prompt lengths for a batch of {cache.batch}")
    gen = torch.Generator().manual_seed(seed)
    vocab, batch = model.config.vocab_size, cache.batch
    prompt = torch.randint(0, vocab, (batch, max(batch_lengths)), generator=gen).to(model.device)
    model(prompt, cache, list(batch_lengths))
    out = []
    for _ in range(n_steps):
        token = torch.randint(0, vocab, (batch, 1), generator=gen).to(model.device)
        tr = trace_step(model, cache, token, [1] * batch, auto_backend=auto_backend)
        out.append(StepTrace(tr.signature(addresses), tuple(tr.host_reads), tr.count_by_kind(), tr.by_section()))
    return out


def differences(a: tuple[LaunchKey, ...], b: tuple[LaunchKey, ...], limit: int = 8) -> list[str]:
    """Where two signatures differ, one line per launch (at most `limit`): its position, name and the
    fields that differ. Empty when they are equal."""
    out = []
    if len(a) != len(b):
        out.append(f"{len(a)} launches vs {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            fields = "; ".join(f"{f} {getattr(x, f)} vs {getattr(y, f)}" for f in LaunchKey._fields
                               if getattr(x, f) != getattr(y, f))
            out.append(f"launch {i} ({x.kind} {x.name}): {fields}")
            if len(out) >= limit:
                break
    return out
