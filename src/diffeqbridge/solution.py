"""Solution objects: save times, saved states, per-sample statistics and return codes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


class ReturnCode(enum.IntEnum):
    """Per-sample outcome of a solve, named as SciMLBase's ``ReturnCode``."""

    Default = 0
    Success = 1
    MaxIters = 2
    DtLessThanMin = 3
    Unstable = 4
    ConvergenceFailure = 5
    Failure = 6
    # a terminating event (deb.ContinuousEvent/DiscreteEvent with terminate=True) stopped the
    # sample: success-like, as SciML's ReturnCode.Terminated
    Terminated = 7

    @property
    def successful(self) -> bool:
        return self in (ReturnCode.Success, ReturnCode.Terminated)


class ReturnCodes(list):
    """``sol.retcode``: one :class:`ReturnCode` per sample, for every batch size (also ``B == 1``).

    It also compares equal to a single :class:`ReturnCode` when every sample has that code,
    so SciML's ``sol.retcode == ReturnCode.Success`` reads as "all samples succeeded".
    """

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ReturnCode):
            return len(self) > 0 and all(code == other for code in self)
        return list.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = None  # type: ignore[assignment]  # a list: unhashable


@dataclass
class Stats:
    """Per-sample counters, each a ``(B,)`` int64 tensor.

    ``nf``/``ng``: drift/diffusion evaluations; ``naccept``/``nreject``: accepted and
    rejected steps.
    """

    nf: Tensor
    ng: Tensor
    naccept: Tensor
    nreject: Tensor
    extra: dict[str, Tensor] = field(default_factory=dict)

    @property
    def nsteps(self) -> Tensor:
        return self.naccept + self.nreject

    def summary(self) -> dict[str, float]:
        """Means over samples (plain floats), handy for printing."""
        out = {name: float(getattr(self, name).double().mean()) for name in ("nf", "ng", "naccept", "nreject")}
        return out

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v:.1f}" for k, v in self.summary().items())
        return f"Stats(mean over {self.nf.numel()} samples: {parts})"


@dataclass
class Solution:
    """Result of :func:`diffeqbridge.solve`.

    Attributes:
        ts: ``(T,)`` save times.
        ys: ``(T, B, *state_shape)`` saved states.
        stats: per-sample :class:`Stats`.
        retcodes: ``(B,)`` int tensor of :class:`ReturnCode` values.
        alg: the solver object used.
        interpolation: dense output (``solve(..., dense=True)``): ``sol(t)``/``sol.evaluate(t)``.
        events: per-sample event record (``solve(..., events=[...])``, :mod:`diffeqbridge.events`).
    """

    ts: Tensor
    ys: Tensor
    stats: Stats
    retcodes: Tensor
    alg: Any = None
    regularization: Tensor | None = None
    # solve(..., dense=True): a diffeqbridge.dense.DenseInterpolation; events=[...]: an EventRecord
    interpolation: Any = None
    events: Any = None

    def evaluate(self, t: Any, per_sample: bool = False) -> Tensor:
        """The dense output at ``t`` (``solve(..., dense=True)``; shapes in :mod:`diffeqbridge.dense`)."""
        if self.interpolation is None:
            raise ValueError("sol(t) needs solve(..., dense=True)")
        return self.interpolation.evaluate(t, per_sample=per_sample)

    def __call__(self, t: Any, per_sample: bool = False) -> Tensor:
        return self.evaluate(t, per_sample=per_sample)

    @property
    def retcode(self) -> ReturnCodes:
        """Per-sample :class:`ReturnCode` list (:class:`ReturnCodes`; one entry per sample, also for ``B == 1``)."""
        return ReturnCodes(ReturnCode(int(c)) for c in self.retcodes.tolist())

    @property
    def success(self) -> bool:
        """True when every sample succeeded (``ReturnCode.Success`` or ``Terminated`` by an event)."""
        ok = (self.retcodes == int(ReturnCode.Success)) | (self.retcodes == int(ReturnCode.Terminated))
        return bool(ok.all())

    @property
    def t(self) -> Tensor:  # SciML-style alias
        return self.ts

    @property
    def u(self) -> Tensor:  # SciML-style alias
        return self.ys

    def __repr__(self) -> str:
        counts = torch.bincount(self.retcodes.long(), minlength=len(ReturnCode)).tolist()
        codes = ", ".join(f"{ReturnCode(i).name}={n}" for i, n in enumerate(counts) if n)
        return (
            f"Solution(alg={type(self.alg).__name__}, ts={tuple(self.ts.shape)}, "
            f"ys={tuple(self.ys.shape)}, retcodes[{codes}], {self.stats!r})"
        )
