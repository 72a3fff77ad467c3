"""A per-rank program: the stage graph it runs over plus one instruction stream per rank."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from dipc.ir.instructions import Instruction

FORMAT_VERSION = 1

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class StageInfo:
    """What the IR needs to know about a stage to check dependencies.

    ``producers``: stages whose outputs this stage reads (edges ``p -> id``).
    ``grad_producers``: the subset of those edges that carry a gradient back.
    ``loads``: batch keys the stage reads from the microbatch (needs a LOAD before FWD).
    ``has_loss``: the stage outputs the loss (its backward is seeded, not received).
    """

    id: int
    rank: int
    modality: str = "backbone"
    producers: tuple[int, ...] = ()
    grad_producers: tuple[int, ...] = ()
    loads: tuple[str, ...] = ()
    has_loss: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Program:
    """Everything every rank executes for one training step."""

    schedule: str
    num_ranks: int
    num_microbatches: int
    stages: tuple[StageInfo, ...]
    streams: tuple[tuple[Instruction, ...], ...]
    attrs: tuple[tuple[str, str], ...] = field(default=())
    subs: tuple[tuple[str, tuple[int, ...]], ...] = field(default=())
    """Modality sub-microbatches: ``(modality, counts)`` with ``counts[mb]`` the number of subs
    microbatch ``mb`` is split into (>= 1). Stages of a listed modality run per sub; all other
    stages run per whole microbatch (``sub=-1``). Empty: nothing is split."""
    microbatch_order: tuple[int, ...] = field(default=())
    """Which of the caller's microbatches each of the program's microbatch slots runs: slot ``m``
    (every ``mb=m`` below) runs microbatch ``microbatch_order[m]`` of the list given to the step.
    A permutation of ``range(num_microbatches)``; empty: slot ``m`` runs microbatch ``m``. A
    planner sets it to run a batch in another order (DIP: lightest microbatch first) without the
    caller reordering its data; executors apply it (:meth:`ordered`) and report per-microbatch
    results in the caller's order (:meth:`unordered`)."""

    def stage(self, stage_id: int) -> StageInfo:
        return self.stages[stage_id]

    @property
    def order_is_valid(self) -> bool:
        """``microbatch_order`` is empty or a permutation of ``range(num_microbatches)``."""
        return not self.microbatch_order or sorted(self.microbatch_order) == list(range(self.num_microbatches))

    def ordered(self, items: Sequence[T]) -> list[T]:
        """The caller's per-microbatch ``items`` (microbatches, loss weights…) in slot order."""
        if not self.microbatch_order:
            return list(items)
        return [items[i] for i in self.microbatch_order]

    def unordered(self, per_slot: Sequence[T]) -> list[T]:
        """Inverse of :meth:`ordered`: per-slot values (losses…) in the caller's order."""
        if not self.microbatch_order:
            return list(per_slot)
        out: list[T] = list(per_slot)
        for slot, i in enumerate(self.microbatch_order):
            out[i] = per_slot[slot]
        return out

    def consumers(self, stage_id: int) -> tuple[int, ...]:
        return tuple(s.id for s in self.stages if stage_id in s.producers)

    def grad_consumers(self, stage_id: int) -> tuple[int, ...]:
        """Stages that send a gradient back to ``stage_id``."""
        return tuple(s.id for s in self.stages if stage_id in s.grad_producers)

    def sub_counts(self, modality: str) -> tuple[int, ...] | None:
        """Per-microbatch sub counts of ``modality``, or None when it is not split."""
        for name, counts in self.subs:
            if name == modality:
                return counts
        return None

    def sub_indices(self, stage_id: int, mb: int) -> range | tuple[int]:
        """The subs stage ``stage_id`` runs for microbatch ``mb``: ``range(n)`` or ``(-1,)``."""
        return sub_indices(self.subs, self.stages[stage_id].modality, mb)

    def stages_of_rank(self, rank: int) -> tuple[int, ...]:
        return tuple(s.id for s in self.stages if s.rank == rank)


def sub_indices(subs: tuple[tuple[str, tuple[int, ...]], ...], modality: str, mb: int) -> range | tuple[int]:
    """``range(counts[mb])`` when ``modality`` is split by ``subs``, else ``(-1,)`` (whole)."""
    for name, counts in subs:
        if name == modality:
            return range(counts[mb])
    return (-1,)
