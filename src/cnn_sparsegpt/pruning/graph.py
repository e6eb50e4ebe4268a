"""Runs a torch.fx graph over the whole calibration set, node by node, stopping at "barriers": nodes that
must see their input for every calibration batch before their own output is defined (a layer to prune, a
BatchNorm to re-estimate). The caller gives each barrier a callback that consumes those inputs.

Which node outputs are stored for the whole set is a policy:
- default: the nodes between two barriers run batch by batch as one segment, as a plain forward runs them, and
  only outputs read after the segment (by the barrier, or later) are stored, dropped batch by batch after their
  last use. The barrier's callback reads each batch of its input right after the segment made it, while it is
  still in the CPU's caches (a BatchNorm's statistics, a layer's Hessian). One forward pass in all; in a residual
  block the block input (kept for the skip) and the current layer's input coexist: two activations.
- low memory: only outputs read by more than one node (block inputs), and a barrier's input when storing it
  lets every other stored output go. Everything else is recomputed from the stored outputs for each
  barrier, so about one activation of the calibration set is alive at a time, for a few more passes.
"""
from __future__ import annotations

import inspect
import operator
import time
from collections.abc import Iterable
from typing import Callable

import torch
from torch import fx, nn

from ..utils import output_tensors

PRUNABLE = (nn.Conv2d, nn.Linear)
# called as modules in a traced graph, subclasses too: torch.fx traces into any class defined outside torch.nn, so a
# model library's own BatchNorm (timm's BatchNormAct2d, 31 of its 50 families in benchmarks/architecture_sweep.py)
# would become functional calls that no barrier stops at (its statistics were silently not re-estimated)
LEAVES = (*PRUNABLE, nn.modules.batchnorm._BatchNorm,
          nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)  # (timm's GroupNorm too: its groups are the walk's)
Barrier = Callable[[Iterable], None]  # called once with a generator of the node's input, batch by batch
_INPLACE_FUNCTIONS = {operator.iadd: operator.add, operator.imul: operator.mul, operator.isub: operator.sub}


class _LayerTracer(fx.Tracer):
    def __init__(self, opaque_on_failure: bool = False, chains: dict[str, list[str]] | None = None):
        super().__init__()
        self.opaque_on_failure = opaque_on_failure
        self.opaque: list[str] = []  # submodules fx could not trace through, called as a whole instead
        self.chains = chains or {}  # such a submodule that only runs its children one after another (chained_parts)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LEAVES) or qualname in self.opaque or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        if not self.opaque_on_failure or self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        last, stack = next(reversed(self.graph.nodes)), dict(self.module_stack)
        calls = dict(getattr(self, "num_calls", {}))  # (torch's call counts per module, where it keeps them)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:  # the innermost module whose forward fx cannot trace (an Ultralytics YOLO's Detect head)
            for node in reversed(list(self.graph.nodes)):  # what its forward had added, users first
                if node is last:
                    break
                self.graph.erase_node(node)
            self.module_stack.clear()
            self.module_stack.update(stack)
            if hasattr(self, "num_calls"):
                self.num_calls.clear()
                self.num_calls.update(calls)
            if name in self.chains and len(args) == 1 and not kwargs:  # its children, traced one after another
                x = args[0]
                for child in self.chains[name]:
                    x = self.call_module(m.get_submodule(child), m.get_submodule(child).forward, (x,), {})
                return x
            self.opaque.append(name)
            return super().call_module(m, forward, args, kwargs)

    def iter(self, obj):
        """The pieces of a chunk or split whose count its arguments give (`list(x.chunk(2, 1))`, Ultralytics' C2f)."""
        n = _pieces(obj.node) if self.opaque_on_failure else None
        return iter([obj[i] for i in range(n)]) if n is not None else super().iter(obj)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _CountedProxy(node, self) if self.opaque_on_failure else super().proxy(node)


class _CountedProxy(fx.Proxy):
    def __len__(self) -> int:  # (list() asks for the length before it iterates)
        n = _pieces(self.node)
        return n if n is not None else super().__len__()


def _pieces(node: fx.Node) -> int | None:
    if node.op not in ("call_method", "call_function") or len(node.args) < 2:
        return None
    if node.target in ("chunk", torch.chunk) and isinstance(node.args[1], int):
        return node.args[1]
    if node.target in ("split", torch.split) and isinstance(node.args[1], (list, tuple)):
        return len(node.args[1])
    return None


def trace(model: nn.Module, opaque_on_failure: bool = False, chains: dict[str, list[str]] | None = None
          ) -> fx.GraphModule:
    """`torch.fx.symbolic_trace(model)` with every Conv2d, Linear and BatchNorm a module call (LEAVES). With
    `opaque_on_failure`, a submodule whose forward fx cannot trace becomes one module call (named in the graph
    module's `opaque_modules`; the layers inside it are not on the graph), a forward(x, *args, **kwargs) is traced as
    called with x alone, and chunks and splits of a known count are iterated; check such a graph against the model.
    chains: submodules that only run their children one after another (chained_parts), traced as such where fx
    cannot trace their own code."""
    tracer = _LayerTracer(opaque_on_failure, chains)
    cls = type(model)
    if opaque_on_failure and any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                                 for p in inspect.signature(cls.forward).parameters.values()):
        # fx would unpack a proxy of *args: a subclass of the model's own class, for the time of the trace
        model.__class__ = type(cls.__name__, (cls,), {"forward": lambda self, x: cls.forward(self, x)})
    try:
        graph = tracer.trace(model)
    finally:
        model.__class__ = cls
    gm = fx.GraphModule(tracer.root, graph, cls.__name__)
    gm.opaque_modules = list(tracer.opaque)
    return gm


@torch.no_grad()
def partial_trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule | None:
    """trace(model, opaque_on_failure=True) where fx cannot trace the whole model, if the graph computes what the
    model does on `example` (the same outputs, bit for bit); None otherwise."""
    try:
        gm, chains = trace(model, opaque_on_failure=True), {}
        for _ in range(4):  # a part traced as a chain of its children may hold one more such part (a round each)
            found = chained_parts(model, example, [n for n in gm.opaque_modules if n not in chains])
            if not found:
                break
            chains |= found
            gm = trace(model, opaque_on_failure=True, chains=chains)
        got, want = output_tensors(gm(example)), output_tensors(model(example))
    except Exception:
        return None
    same = len(got) == len(want) and all(g.shape == w.shape and torch.equal(g, w) for g, w in zip(got, want))
    return gm if same else None


@torch.no_grad()
def chained_parts(model: nn.Module, example: torch.Tensor, parts: list[str]) -> dict[str, list[str]]:
    """Those of the submodules `parts` (the ones fx could not trace) whose forward, run on `example`, only passes its
    one input through its direct children one after another, each called once, each reading exactly what the one
    before returned, unchanged, the last's output its own (checks in Python around them, as a Hugging Face ResNet's
    stem checks its input's channel count): name → the children in call order. Such a part is then traced as that
    chain (trace's chains); the caller checks the graph against the model."""
    if not parts:
        return {}
    names = {m: n for n, m in model.named_modules()}
    watched = dict.fromkeys(model.get_submodule(n) for n in parts)  # (an ordered set)
    parent = {child: m for m in watched for child in m.children()}
    runs: dict[nn.Module, dict] = {}  # module → its run: input, children called, ok so far
    hooks = []

    def before(m, args, kwargs):
        run = runs.get(parent.get(m))
        if run is not None:  # a child of a module being run: it must read what came before, unchanged
            last = run["calls"][-1][1] if run["calls"] else run["input"]
            run["ok"] = run["ok"] and last is not None and last[0] is not None and len(args) == 1 and not kwargs \
                and args[0] is last[0] and torch.equal(args[0], last[1])
            run["calls"].append((m, None))
        if m in watched and m not in runs:
            runs[m] = {"input": (args[0], args[0].clone()) if len(args) == 1 and not kwargs and torch.is_tensor(
                args[0]) else (None, None), "calls": [], "ok": len(args) == 1 and not kwargs}

    def after(m, args, out):
        if m in runs:
            runs[m].setdefault("out", out)  # (its first call's)
        run = runs.get(parent.get(m))
        if run is not None and run["calls"] and run["calls"][-1][0] is m and torch.is_tensor(out):
            run["calls"][-1] = (m, (out, out.clone()))
        elif run is not None:
            run["ok"] = False

    for m in dict.fromkeys([*watched, *parent]):  # the parts and their children
        hooks += [m.register_forward_pre_hook(before, with_kwargs=True), m.register_forward_hook(after)]
    try:
        out = model(example)
    except Exception:
        return {}
    finally:
        for h in hooks:
            h.remove()
    del out
    found = {}
    for m, run in runs.items():
        calls = [c for c, _ in run["calls"]]
        if m not in watched or not run["ok"] or not calls or len(set(calls)) != len(calls) \
                or run["calls"][-1][1] is None:
            continue
        last, saved = run["calls"][-1][1]
        if run.get("out") is not last or not torch.equal(last, saved):  # its output: the last child's, unchanged
            continue
        found[names[m]] = [names[c][len(names[m]) + 1:] for c in calls]
    return found


# a weight the model's own code froze while the rest trains is a fixed operation, not a learned one (Ultralytics
# YOLO's DFL: a 1x1 conv whose weights are 0..15, the expectation over a box side's distribution): pruned or re-fitted
# it would compute another operation
FROZEN = ("its weight is frozen (requires_grad=False): a fixed operation of the model, such as an Ultralytics YOLO "
          "head's DFL integral, left as it is (set requires_grad=True to prune it)")


def computed_weight(m: nn.Module) -> str:
    """Why a layer whose weight is computed from other parameters (weight_norm) stays as it is, and what to do."""
    return (f"its weight is computed from other parameters ({type(m).__name__}: weight_norm or a parametrization), "
            "so a pruned weight would not stay: left as it is. Remove it before pruning, as inference code does "
            "(torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight'); torch.nn.utils.remove_weight_norm "
            "for the old weight_norm)")


@torch.no_grad()
def nonstandard_layers(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Conv2d/Linear subclasses that do not compute what their base class computes with their stored weight, checked
    on `example`: name → why the layer stays as it is. A prune zeroes and re-fits the stored weight as the input's
    product with it; a layer that transforms its weight first (timm's ScaledStdConv2d: weight standardization, so a
    zeroed weight is not zero in the product) or pads its input itself (timm's Conv2dSame) breaks that, and so does a
    weight computed from other parameters (weight_norm), which the next forward would overwrite. Subclasses that
    only re-state the base (timm's Linear) pass."""
    found = {n: computed_weight(m) for n, m in model.named_modules()
             if isinstance(m, PRUNABLE) and "weight" not in m._parameters}
    if any(p.requires_grad for p in model.parameters()):  # (a model frozen whole, for inference: none is fixed)
        found |= {n: FROZEN for n, m in model.named_modules()
                  if isinstance(m, PRUNABLE) and n not in found and not m.weight.requires_grad}
    names = {m: n for n, m in model.named_modules() if isinstance(m, PRUNABLE) and n not in found
             and type(m).forward not in (nn.Conv2d.forward, nn.Linear.forward)}

    def hook(m, inp, out):
        base = nn.Conv2d if isinstance(m, nn.Conv2d) else nn.Linear
        try:
            same = base.forward(m, inp[0])
            ok = same.shape == out.shape and torch.allclose(same, out, rtol=1e-4, atol=1e-5 * float(out.abs().max()))
        except Exception:  # (e.g. the base's padding cannot even run on this input)
            ok = False
        if not ok:
            found[names[m]] = f"{type(m).__name__} computes something else than {base.__name__} with its weight " \
                              "(it transforms the weight or pads its input itself): left as it is"

    if names:
        run_hooked(model, [example], [m.register_forward_hook(hook) for m in names])
    return found


class GraphStop(Exception):
    """The graph cannot be run this way (the caller falls back to another executor)."""


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class GraphExecutor:
    def __init__(self, gm: fx.GraphModule, batches: list, barriers: dict[str, Barrier], low_memory: bool = False,
                 sync: Callable[[], None] = lambda: None, skip: Callable[[str], bool] = lambda target: False,
                 keep_until: Iterable[str] = ()):
        """barriers: call_module target → callback. Nodes after the last barrier are never computed. skip(target):
        asked when the run reaches a barrier's segment, after the barriers before it ran: True makes it an
        ordinary node (a BatchNorm whose statistics are already known). keep_until: names of nodes after which
        outputs read by them stay at hand for `output` (a residual sum whose operand a barrier reads), even past
        the last barrier."""
        self.gm, self.batches, self.low_memory, self.sync, self.skip = gm, batches, low_memory, sync, skip
        self.nodes = [n for n in gm.graph.nodes if n.op != "output"]
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.reached_barrier = -1  # index of the barrier whose callback runs now (or ran last)
        self.barriers = {n: barriers[n.target] for n in self.nodes if n.op == "call_module" and n.target in barriers}
        self.last = max((self.index[n] for n in self.barriers), default=-1)
        if self.last >= 0:  # (nothing to keep at hand without a barrier)
            names = set(keep_until)
            self.last = max([self.last] + [self.index[n] for n in self.nodes if n.name in names])
        self.layers = {n for n in self.nodes  # Conv2d/Linear calls, whose evaluations count forward passes
                       if n.op == "call_module" and isinstance(gm.get_submodule(n.target), PRUNABLE)}
        self.stored: dict[fx.Node, list] = {}
        self.reached = -1  # index of the last barrier run
        self.forward_seconds = 0.0  # time spent computing node outputs (not in the barrier callbacks)
        self.layer_calls = 0  # outputs of self.layers computed, batch by batch
        self.peak_stored_bytes = 0  # most bytes of stored outputs alive at once (the calibration batches included)
        self._held: dict[int, list] = {}  # storage address → [bytes, references], so aliases count once
        self._held_bytes = 0

    def run(self) -> float:
        """Run up to the last barrier; return the forward passes spent (Conv/Linear evaluations per batch,
        over those of one plain pass)."""
        for _ in self.steps():
            pass
        return self.passes()

    def steps(self):
        """The run as a generator that yields after each barrier, so that another graph can be advanced in
        step with it (the dense network beside the pruned one, dense_target.py)."""
        return self._recomputing_steps() if self.low_memory else self._segment_steps()

    def _segment_steps(self):
        """Default policy: the nodes from one barrier up to the next run batch-major as a segment, driven by the
        next barrier's reading of its input (node-major, each output would leave the caches before its consumer
        reads it: ResNet-50's forward phase was 1.34x a plain forward)."""
        order = self.nodes[:self.last + 1]
        ends = sorted(self.index[n] for n in self.barriers)
        start = 0
        try:
            for end in ends:
                if self.skip(order[end].target):
                    continue  # an ordinary node of the segment up to the next barrier
                for node in order[start:end]:
                    if node.op == "placeholder":
                        self._place(node)
                segment = _Segment(self, [n for n in order[start:end]
                                          if n.op != "placeholder" and self._needed_by(n)], end)
                barrier = order[end]
                self.reached_barrier = end
                self.barriers[barrier](_SegmentInput(segment, barrier.args[0]))
                segment.finish()
                self.reached = end
                yield barrier
                start = end
        finally:
            self.stored.clear()

    def _place(self, node: fx.Node) -> None:
        """A placeholder's values: the calibration batches for the first, a constant default for the others."""
        nb = len(self.batches)
        if self.stored:
            if not node.args:
                raise GraphStop("forward takes more than one required input")
            self.stored[node] = [node.args[0]] * nb  # a constant, not counted
        else:
            self.stored[node] = list(self.batches)  # a copy: entries are dropped once used up
            for x in self.batches:
                self._hold(x, +1)

    def _recomputing_steps(self):
        """Low-memory policy: node by node, storing only what `_keep` says and recomputing the rest."""
        inplace = _disable_inplace(self.gm)  # recomputed nodes read inputs that later nodes read again
        try:
            for t, node in enumerate(self.nodes[:self.last + 1]):
                if node.op == "placeholder":
                    self._place(node)
                    continue
                if node in self.barriers and not self.skip(node.target):
                    self.reached_barrier = t
                    self.barriers[node](_Replayable(self, node.args[0]))
                    self.reached = t
                    yield node
                if self._keep(node, t):
                    self._store(node, t)
        finally:
            for mod in inplace:
                mod.inplace = True
            self.stored.clear()

    def passes(self) -> float:
        """Layer outputs computed over those of one plain pass up to the last barrier run (a skipped last barrier's
        input is never computed)."""
        nb, reached = len(self.batches), self.reached
        layers = sum(1 for n in self.nodes[:reached + 1]
                     if n in self.layers and any(self.index[u] <= reached for u in self._needed_by(n)))
        return self.layer_calls / (layers * nb) if layers else 1.0

    def output(self, name: str, b: int):
        """Node `name`'s output for batch b while the run is at a barrier after it: stored, or in low-memory mode
        recomputed from what is stored; None where the default policy did not keep it."""
        node = self.by_name.get(name)
        if node is None or self.index[node] > self.reached_barrier:
            return None
        if node in self.stored and self.stored[node][b] is not None:
            return self.stored[node][b]
        return self._timed_value(node, b) if self.low_memory else None

    # --- which outputs to store -------------------------------------------------------------------
    def _alive(self, m: fx.Node, t: int, extra: fx.Node | None = None) -> bool:
        """Whether stored node m is still needed once node t (and `extra`, if it is being stored) is done:
        some node to be run after t reaches it through outputs that are not stored."""
        todo, seen = list(m.users), set()
        while todo:
            u = todo.pop()
            if u in seen or u.op == "output":
                continue
            seen.add(u)
            i = self.index[u]
            if i > t:
                if i <= self.last:
                    return True
            elif u not in self.stored and u is not extra:
                todo.extend(u.users)
        return False

    def _needed_by(self, node: fx.Node) -> list[fx.Node]:
        """The users of node that will run (an output nobody up to the last barrier reads is not computed)."""
        return [u for u in node.users if u.op != "output" and self.index[u] <= self.last]

    def _keep(self, node: fx.Node, t: int) -> bool:
        needed = self._needed_by(node)
        if len(needed) > 1:
            return True
        feeds_barrier = any(u in self.barriers and not self.skip(u.target) and u.args and u.args[0] is node
                            for u in needed)
        return feeds_barrier and not any(self._alive(m, t, extra=node) for m in self.stored)

    def _store(self, node: fx.Node, t: int) -> None:
        dying = [m for m in self.stored if not self._alive(m, t, extra=node)]
        outs = []
        for b in range(len(self.batches)):
            outs.append(self._timed_value(node, b))
            self._hold(outs[-1], +1)
            for m in dying:  # batch by batch, so that inputs and outputs never coexist whole
                self._hold(self.stored[m][b], -1)
                self.stored[m][b] = None
        for m in dying:
            del self.stored[m]
        self.stored[node] = outs

    def _hold(self, x, count: int) -> None:
        """Count a stored output in (+1) or out (-1) of the bytes held, tracking the peak."""
        if not isinstance(x, torch.Tensor) or (count < 0 and x.untyped_storage().data_ptr() not in self._held):
            return  # not a tensor, or a constant that was never counted in
        storage = x.untyped_storage()
        entry = self._held.setdefault(storage.data_ptr(), [storage.nbytes(), 0])
        if entry[1] == 0:
            self._held_bytes += entry[0]
        entry[1] += count
        if entry[1] == 0:
            self._held_bytes -= entry[0]
            del self._held[storage.data_ptr()]
        self.peak_stored_bytes = max(self.peak_stored_bytes, self._held_bytes)

    # --- computing outputs -------------------------------------------------------------------------
    def _stream(self, node: fx.Node):
        for b in range(len(self.batches)):
            x = self._timed_value(node, b)
            yield x
            del x

    def _timed_value(self, node: fx.Node, b: int):
        t0 = time.perf_counter()
        x = self._value(node, b, {})
        self.sync()
        self.forward_seconds += time.perf_counter() - t0
        return x

    def _value(self, node: fx.Node, b: int, memo: dict):
        """node's output for batch b, from stored outputs, computing what is missing (memo: this batch's).
        Iterative, so a long chain of recomputed nodes cannot hit Python's recursion limit."""
        def known(n):
            return self.stored[n][b] if n in self.stored else memo[n]

        stack = [node]
        while stack:
            n = stack[-1]
            if n in self.stored or n in memo:
                stack.pop()
                continue
            missing = [a for a in n.all_input_nodes if a not in self.stored and a not in memo]
            if missing:
                stack.extend(missing)
                continue
            args, kwargs = fx.node.map_arg(n.args, known), fx.node.map_arg(n.kwargs, known)
            memo[n] = self._call(n, args, kwargs)
            self.layer_calls += n in self.layers
            stack.pop()
        return known(node)

    def _call(self, node: fx.Node, args, kwargs):
        return call_node(self.gm, node, args, kwargs, self.low_memory)


def _disable_inplace(gm: nn.Module) -> list:
    """Modules with inplace=True set to False; returns them, to be set back."""
    mods = [m for m in gm.modules() if getattr(m, "inplace", None) is True]
    for m in mods:
        m.inplace = False
    return mods


def call_node(gm: fx.GraphModule, node: fx.Node, args, kwargs, out_of_place: bool = False):
    """One node's output from its evaluated args. out_of_place: in-place functions and methods run out of place
    (modules are made so by `_disable_inplace`), for inputs that are read again after this node."""
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "get_attr":
        return _fetch_attr(gm, node.target)
    if node.op == "call_function":
        fn = node.target
        if out_of_place:
            fn = _INPLACE_FUNCTIONS.get(fn, fn)
            if kwargs.get("inplace"):
                kwargs = dict(kwargs, inplace=False)
        return fn(*args, **kwargs)
    if node.op == "call_method":
        name = node.target
        if out_of_place and name.endswith("_") and not name.startswith("_") and hasattr(args[0], name[:-1]):
            name = name[:-1]
        return getattr(args[0], name)(*args[1:], **kwargs)
    raise GraphStop(f"unsupported graph node {node.op}")


def _reads(node: fx.Node, names) -> bool:
    """Whether the node calls one of the modules `names` (or a part called whole that holds one) or reads one of
    their parameters."""
    if node.op == "call_module":
        return node.target in names or any(n.startswith(node.target + ".") for n in names)
    return node.op == "get_attr" and any(node.target.startswith(n + ".") for n in names)


@torch.no_grad()
def each_change(gm: fx.GraphModule, xs: list[torch.Tensor], changes: dict, change):
    """The graph's outputs on the chunks of images xs with one change at a time: yields (key, [output per chunk])
    for each key of `changes` {key: names of the modules the change touches}, in graph order of the first node that
    reads one of them, then (None, the unchanged outputs). change(key) is a context manager that applies the change,
    once for all chunks. The nodes before that first node are computed once, by the unchanged pass; only those from
    it on run again for the change (about half a forward pass per layer of a chain)."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    last = {n: max((index[u] for u in n.users), default=-1) for n in nodes}
    starts: dict[int, list] = {}
    for key, names in changes.items():  # a change no node reads runs from the input
        starts.setdefault(next((i for i, n in enumerate(nodes) if _reads(n, set(names))), 0), []).append(key)
    envs: list[dict[fx.Node, object]] = [{} for _ in xs]
    inplace = _disable_inplace(gm)  # values of the unchanged pass are read by every later run
    try:
        for i, node in enumerate(nodes):
            for key in starts.get(i, []):
                with change(key):
                    yield key, [_run_from(gm, nodes, i, env, last, x) for env, x in zip(envs, xs)]
            if node.op == "output":
                yield None, [fx.node.map_arg(node.args[0], env.__getitem__) for env in envs]
                return
            for env, x in zip(envs, xs):
                env[node] = _evaluate(gm, node, env.__getitem__, x)
                for a in node.all_input_nodes:
                    if last[a] <= i:
                        env.pop(a, None)
    finally:
        for mod in inplace:
            mod.inplace = True


def _evaluate(gm, node, lookup, x):
    if node.op == "placeholder":
        if node is not next(iter(gm.graph.nodes)):  # only the first input is given; the others keep defaults
            if not node.args:
                raise GraphStop("forward takes more than one required input")
            return node.args[0]
        return x
    args, kwargs = fx.node.map_arg(node.args, lookup), fx.node.map_arg(node.kwargs, lookup)
    return call_node(gm, node, args, kwargs, out_of_place=True)


def _run_from(gm, nodes, start, env, last, x):
    """The graph's output computed from node `start` on, reading earlier nodes' values from env (unchanged)."""
    local: dict[fx.Node, object] = {}

    def lookup(n):
        return local[n] if n in local else env[n]

    for i in range(start, len(nodes)):
        node = nodes[i]
        if node.op == "output":
            return fx.node.map_arg(node.args[0], lookup)
        local[node] = _evaluate(gm, node, lookup, x)
        for a in node.all_input_nodes:
            if last[a] <= i:
                local.pop(a, None)
    raise GraphStop("the graph has no output")


class _Segment:
    """The nodes from one barrier up to (not including) the next, run batch by batch in graph order, as a plain
    forward runs them: outputs read after the segment are stored, the others live for their batch only."""

    def __init__(self, executor: GraphExecutor, nodes: list[fx.Node], end: int):
        self.ex, self.nodes, self.done = executor, nodes, 0  # batches computed so far
        index = executor.index
        last_use = {n: max(index[u] for u in executor._needed_by(n)) for n in nodes}
        self.keep = {n for n in nodes if last_use[n] >= end}
        for n in self.keep:
            executor.stored[n] = [None] * len(executor.batches)
        self.dying = [m for m in executor.stored if max((index[u] for u in executor._needed_by(m)), default=-1) < end]

    def compute(self, b: int) -> None:
        """Batch b of every node in the segment, then drop what nothing after the segment reads."""
        ex, stored, memo = self.ex, self.ex.stored, {}

        def known(n):
            return stored[n][b] if n in stored else memo[n]

        t0 = time.perf_counter()
        for n in self.nodes:
            args, kwargs = fx.node.map_arg(n.args, known), fx.node.map_arg(n.kwargs, known)
            value = ex._call(n, args, kwargs)
            ex.layer_calls += n in ex.layers
            if n in self.keep:
                stored[n][b] = value
                ex._hold(value, +1)
            else:
                memo[n] = value
        del memo
        for m in self.dying:
            ex._hold(stored[m][b], -1)
            stored[m][b] = None
        ex.sync()
        ex.forward_seconds += time.perf_counter() - t0
        self.done = b + 1

    def finish(self) -> None:
        """The batches the barrier did not read (it may read none, or stop early)."""
        for b in range(self.done, len(self.ex.batches)):
            self.compute(b)
        for m in self.dying:
            del self.ex.stored[m]


class _SegmentInput:
    """A barrier's input batches: each made by its segment when first read, from storage when read again."""

    def __init__(self, segment: _Segment, node: fx.Node):
        self.segment, self.node = segment, node

    def __iter__(self):
        stored = self.segment.ex.stored
        for b in range(len(self.segment.ex.batches)):
            if b >= self.segment.done:
                self.segment.compute(b)
            yield stored[self.node][b]


class _Replayable:
    """A barrier's input batches, computed (or read from storage) anew each time they are iterated."""

    def __init__(self, executor: GraphExecutor, node: fx.Node):
        self.executor, self.node = executor, node

    def __iter__(self):
        return self.executor._stream(self.node)


def module_calls(traced: fx.GraphModule, names) -> dict[str, list[fx.Node]]:
    """Per module of `names` that the graph calls: its call_module nodes, in graph order."""
    calls: dict[str, list[fx.Node]] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module" and node.target in names:
            calls.setdefault(node.target, []).append(node)
    return calls


def is_add(node: fx.Node) -> bool:
    """Whether a node adds tensors (a + b, a += b, torch.add, Tensor.add)."""
    if node.op == "call_function":
        return node.target in (operator.add, operator.iadd, torch.add)
    return node.op == "call_method" and node.target in ("add", "add_")


def sole_batchnorm_reader(node: fx.Node, modules: dict[str, nn.Module], affine: bool = False,
                          squeezed: bool = False) -> fx.Node | None:
    """The call of a BatchNorm with running statistics that alone reads `node`'s output, or None. affine: only one
    whose output is the affine map itself (not a subclass with its own forward, such as timm's BatchNormAct2d).
    squeezed: also through a squeeze of the output's unit height (a Conv1d's view, conv_views.py), which keeps
    each channel's values as they are."""
    users = list(node.users)
    if squeezed and len(users) == 1 and users[0].op == "call_method" and users[0].target == "squeeze" \
            and users[0].args[1:] in ((-2,), (2,)):
        users = list(users[0].users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    reader = modules.get(users[0].target)
    if isinstance(reader, nn.modules.batchnorm._BatchNorm) and reader.running_mean is not None and \
            (not affine or type(reader).forward is nn.modules.batchnorm._BatchNorm.forward):
        return users[0]
    return None


def available_memory(device: torch.device) -> int | None:
    """Bytes free for activations: the GPU's free memory, or the OS's MemAvailable (Linux); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_policy(largest_input: int, nsamples: int, device: torch.device, free: int | None = None,
                  copies: int = 1) -> tuple[bool, str]:
    """(low_memory, why) for `low_memory=None`: the default executor holds about two activations of the
    calibration set (a block's input for the skip, and the current layer's), low_memory about one; `copies`
    networks run side by side (2 with the dense target's dense copy in step). Take the default while those
    activations fit in half of the free memory (the rest is for Hessians, unfolded patches and the
    allocator's slack)."""
    fits, why = _within_half(2 * copies, largest_input * nsamples, device, free)
    return (False, f"default ({why})") if fits else (True, f"low-memory ({why})")


def _within_half(n: int, activation: int, device: torch.device, free: int | None) -> tuple[bool, str]:
    """Whether n activations of `activation` bytes fit in half of the free memory, and the numbers that say so."""
    need, gb = n * activation, 2**30
    free = available_memory(device) if free is None else free
    if free is None:
        return True, "free memory unknown"
    if need <= free / 2:
        return True, f"{n} activations = {need / gb:.1f} GB of {free / gb:.1f} GB free"
    return False, f"{n} activations = {need / gb:.1f} GB would exceed half of {free / gb:.1f} GB free"


def stored_parts(model: nn.Module, parts: list[str], example: torch.Tensor, nsamples: int, device: torch.device,
                 copies: int = 1, free: int | None = None) -> tuple[list[str], str]:
    """The parts (a partly traced graph's opaque_modules) whose inputs part_inputs may store, and why: a part's
    stored inputs are an activation of the whole calibration set per network (`copies`), held while its layers
    take theirs from them, so memory_policy's rule applies to the part's inputs (measured on `example`); the
    other parts' layers get one forward pass each."""
    modules, kept, why = dict(model.named_modules()), [], []
    for name in parts:
        try:
            (args, kwargs), = calls_of(model, modules[name], [example])
        except IndexError:  # not called on this input: nothing to store
            continue
        per_image = sum(t.numel() * t.element_size() for t in output_tensors([args, kwargs])) // max(len(example), 1)
        fits, numbers = _within_half(2 * copies, per_image * nsamples, device, free)
        kept += [name] * fits
        why.append(f"{name}'s inputs {'stored' if fits else 'not stored, one forward per layer in it'} ({numbers})")
    return kept, "; ".join(why)


class _Stop(Exception):
    pass


@torch.no_grad()
def calls_of(model: nn.Module, module: nn.Module, batches: Iterable[torch.Tensor]):
    """The (args, kwargs) module is called with (at its first call) for each batch in turn, from forward passes of
    model cut short at module."""
    captured = []

    def grab(_m, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for x in batches:
            try:
                model(x)
            except _Stop:
                pass
            yield captured.pop()
    finally:
        handle.remove()


def inputs_of(model: nn.Module, module: nn.Module, batches: Iterable[torch.Tensor]):
    """module's input for each batch in turn, from forward passes of model cut short at module (for models
    that cannot run as a traced graph: half a pass per layer on average)."""
    return (args[0] for args, _ in calls_of(model, module, batches))


def part_inputs(model: nn.Module, part: nn.Module, batches: Iterable[torch.Tensor]) -> list[tuple]:
    """The (args, kwargs) `part`, a submodule, is called with for each batch: then its layers' inputs come from
    running the part alone (part_runner)."""
    return list(calls_of(model, part, batches))


def part_runner(part: nn.Module) -> Callable:
    """part called on one of part_inputs' entries (what inputs_of runs, cut short at a layer inside the part)."""
    return lambda call: part(*call[0], **call[1])


def layer_source(model: nn.Module, name: str, batches: list, parts: Iterable[str], stored: dict
                 ) -> tuple[Callable, list, int]:
    """What runs to reach module `name`, on what, and the forward passes that took: the model on the batches; or,
    inside a part listed in `parts` (a partly traced graph's opaque_modules, its pass done), the part alone on its
    inputs, kept in `stored` from one pass cut short at the part when its first module comes (the inputs of the part
    before are dropped then)."""
    part = opaque_part(name, parts)
    if part is None:
        return model, batches, 0
    passes = 0
    if part not in stored:
        stored.clear()
        stored[part], passes = part_inputs(model, model.get_submodule(part), batches), 1
    return part_runner(model.get_submodule(part)), stored[part], passes


def layer_inputs(model: nn.Module, names: list[str], batches: list[torch.Tensor], parts: Iterable[str] = ()):
    """(name, its inputs batch by batch, forward passes made) for each module named in turn, where no traced graph
    serves it: from one forward pass cut short at the module, or from its part's stored inputs (layer_source)."""
    stored = {}
    for name in names:
        run, data, passes = layer_source(model, name, batches, parts, stored)
        yield name, list(inputs_of(run, model.get_submodule(name), data)), passes + (run is model)
    stored.clear()


def call_order(model: nn.Module, names: Iterable[str], example: torch.Tensor) -> list[str]:
    """The modules named, in the order a forward pass on `example` first calls them (those it never calls left
    out)."""
    modules, seen = dict(model.named_modules()), {}

    def called(name):
        def hook(_m, _args):
            seen.setdefault(name, len(seen))  # (a hook that returns something replaces the module's input)
        return hook

    run_hooked(model, [example], [modules[n].register_forward_pre_hook(called(n)) for n in names])
    return sorted(seen, key=seen.get)


def opaque_part(name: str, parts: Iterable[str]) -> str | None:
    """The part called whole (graph module's opaque_modules) that holds layer `name`, or None."""
    return next((p for p in parts if name.startswith(f"{p}.")), None)


@torch.no_grad()
def weight_positions(layer: nn.Module, inp: torch.Tensor, out: torch.Tensor, examples: int) -> int:
    """Positions per example a layer applies its weight at, so that its multiply-adds per example are
    weight.numel() · positions: output H·W for a conv, input H·W for a transposed conv (each weight entry meets each
    position of the channels its weight's dim 0 counts once), 1 for a Linear on vectors."""
    counted = inp if isinstance(layer, nn.modules.conv._ConvTransposeNd) else out
    return counted.numel() // (layer.weight.shape[0] * max(examples, 1))


def run_hooked(model: nn.Module, batches, handles: list) -> None:
    """Run `model` over `batches` for what its hooks record; the hooks are removed afterwards, always."""
    try:
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
