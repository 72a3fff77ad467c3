"""Errors dipc raises. Every message names the culprit (module, node, batch key, rank) and ends
with a "Fix:" clause, so users never have to read a stack trace from deep inside torch."""
from __future__ import annotations

from typing import Mapping


class DipcError(Exception):
    """Base class of every error dipc raises on purpose."""


class TraceError(DipcError):
    """A model (or one of its modules) could not be captured as an FX graph."""


class TaggingError(DipcError):
    """Modality tagging failed or a user override names something that does not exist."""


class PartitionError(DipcError):
    """Layers could not be laid out over the requested stages."""


class BatchError(DipcError):
    """A batch does not match what the pipeline was compiled for."""


class ScheduleError(DipcError):
    """A schedule or program is invalid (unmatched send/recv, dependency order, deadlock)."""


class IRParseError(DipcError):
    """Text or JSON could not be parsed back into an IR program."""


class RuntimeStepError(DipcError):
    """An instruction failed (or timed out) while a rank executed its stream."""

    def __init__(self, rank: int, step: int, instruction: str, message: str):
        self.rank, self.step, self.instruction = rank, step, instruction
        super().__init__(f"rank {rank}, step {step} ({instruction}): {message}")


class InfeasibleMemoryError(DipcError):
    """No plan fits the memory limit. ``excess_bytes``: rank -> bytes over its limit, where known."""

    def __init__(self, message: str, excess_bytes: Mapping[int, float] | None = None):
        super().__init__(message)
        self.excess_bytes = dict(excess_bytes or {})

    @property
    def excess(self) -> float:
        """The largest excess over any rank's limit (infinite when unknown)."""
        return max(self.excess_bytes.values(), default=float("inf"))
