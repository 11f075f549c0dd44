"""``compile=True`` on CUDA: the compiled iteration call captured once as a CUDA graph.

A compiled call of the loop (``check_every`` iterations, :meth:`Integrator._iteration`)
reads the loop state's tensors and replaces them with new ones.  :func:`capture` runs it on
static copies of those tensors under graph capture, then copies its outputs back into the
same static tensors, so the captured graph updates the state in place: one replay per call,
no kernel launches from the host and no host synchronisation inside.  The loop state is then
bound to the static tensors (:meth:`GraphedCall.replay`); a field the loop replaced between
calls is copied in first.

Only states whose leaves are tensors, None, bools, ints, floats or strings are captured
(anything else could hide tensors the graph would not see), and only without autograd (a
replay records no graph).  Unmeasured here: no GPU was available to develop this
(docs/engine.md, "compile=True").
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

#: leaf types a captured state may hold besides tensors (compared as part of its layout)
_PLAIN = (type(None), bool, int, float, str)


class Graph(Protocol):
    """What :func:`capture` needs of a graph: record ``body``'s kernels, then run them."""

    def capture(self, body: Callable[[], None]) -> None: ...

    def replay(self) -> None: ...


class CudaGraph:
    """:class:`torch.cuda.CUDAGraph` behind :class:`Graph`."""

    def __init__(self) -> None:
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, body: Callable[[], None]) -> None:
        with torch.cuda.graph(self.graph):
            body()

    def replay(self) -> None:
        self.graph.replay()


def wanted(device: torch.device) -> bool:
    """Whether compiled calls on ``device`` are captured as graphs: CUDA devices, unless the
    environment sets ``DIFFEQBRIDGE_CUDA_GRAPHS=0``."""
    return device.type == "cuda" and os.environ.get("DIFFEQBRIDGE_CUDA_GRAPHS", "1") != "0"


def layout(state: Any, names: Sequence[str]) -> tuple[Any, list[Any]] | None:
    """``(key, leaves)`` of ``state``'s fields ``names``: ``key`` is equal for two states a
    graph captured on one can run on (tree structure, plain leaves, tensor shapes, strides,
    dtypes and devices); None when a leaf is neither a tensor nor plain, or needs gradients."""
    leaves, spec = tree_flatten({name: getattr(state, name) for name in names})
    key: list[Any] = [spec]
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            if leaf.requires_grad:
                return None
            key.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device))
        elif isinstance(leaf, _PLAIN):
            key.append(leaf)
        else:
            return None
    return tuple(key), leaves


class GraphedCall:
    """A captured call: :meth:`replay` runs it on a state of the captured layout."""

    def __init__(self, graph: Graph, names: Sequence[str], static: list[Any], spec: Any, keep: list[Any]):
        self.graph, self.names, self.static, self.spec = graph, tuple(names), static, spec
        self._keep = keep  # the captured call's own outputs (their memory is the graph's)

    def replay(self, state: Any, leaves: list[Any]) -> None:
        """Run the captured call on ``state`` (``leaves``: its current leaves, from
        :func:`layout`), updating it in place; its fields are the static tensors afterwards."""
        rebind = False
        for dst, src in zip(self.static, leaves):
            if isinstance(dst, Tensor) and src is not dst:
                dst.copy_(src)
                rebind = True
        self.graph.replay()
        if rebind:
            for name, value in tree_unflatten(self.static, self.spec).items():
                setattr(state, name, value)


def capture(fn: Callable[[Any], None], state: Any, names: Sequence[str], graph: Graph) -> GraphedCall:
    """Capture ``fn(work)`` -- which replaces tensor fields ``names`` of ``work``, a shallow
    copy of ``state`` -- into ``graph``, on static copies of ``state``'s tensors that the
    graph updates in place.  Nothing runs yet (``state`` is unchanged); raises when ``fn``
    changes the state's layout.  ``fn`` must already be compiled for this layout (compiling
    during capture fails)."""
    found = layout(state, names)
    if found is None:
        raise ValueError("the loop state holds tensors that need gradients or values that are not tensors")
    key, leaves = found
    static = [leaf.clone() if isinstance(leaf, Tensor) else leaf for leaf in leaves]
    spec = tree_flatten({name: getattr(state, name) for name in names})[1]
    keep: list[Any] = []

    def body() -> None:
        work = copy.copy(state)
        for name, value in tree_unflatten(static, spec).items():
            setattr(work, name, value)
        fn(work)
        after = layout(work, names)
        if after is None or after[0] != key:
            raise RuntimeError("the compiled call changed the loop state's layout")
        for dst, src in zip(static, after[1]):
            if isinstance(dst, Tensor) and src is not dst:
                dst.copy_(src)
        keep[:] = [work]

    graph.capture(body)
    return GraphedCall(graph, names, static, spec, keep)
