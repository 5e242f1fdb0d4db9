"""
The phases of a :class:`buildcache.fetch.download.Download` and the moves
between them: :class:`Phase`, the table of legal moves (:data:`NEXT`), the
sets of phases a download's methods ask about, and the error an illegal
move raises.  What each phase means, and which transition method makes
each move, is in :mod:`buildcache.fetch.download`'s docstring.
"""

from __future__ import annotations

import enum

__all__ = ["ENDED", "IllegalTransition", "MEMORY", "NEXT", "Phase", "RECEIVING"]


class Phase(enum.Enum):
    """
    Where a :class:`Download` is (see the module docstring).
    """

    CONNECTING = "connecting"
    SPOOLING = "spooling"
    IN_MEMORY = "in memory"
    HELD_BACK = "held back"
    ABANDONED = "abandoned"
    NOT_MODIFIED = "not modified"
    COMPLETE = "complete"
    FAILED = "failed"
    SETTLED = "settled"


#: The phases each phase may move to.
NEXT: dict[Phase, frozenset[Phase]] = {
    Phase.CONNECTING: frozenset(
        {Phase.SPOOLING, Phase.IN_MEMORY, Phase.NOT_MODIFIED, Phase.FAILED}
    ),
    # CONNECTING again: a shared copy that failed, answered to nobody
    # (see Download.restart).
    Phase.SPOOLING: frozenset(
        {Phase.IN_MEMORY, Phase.COMPLETE, Phase.FAILED, Phase.CONNECTING}
    ),
    Phase.IN_MEMORY: frozenset(
        {Phase.HELD_BACK, Phase.ABANDONED, Phase.COMPLETE, Phase.FAILED, Phase.CONNECTING}
    ),
    Phase.HELD_BACK: frozenset(
        {Phase.IN_MEMORY, Phase.ABANDONED, Phase.COMPLETE, Phase.FAILED, Phase.CONNECTING}
    ),
    Phase.ABANDONED: frozenset({Phase.FAILED, Phase.CONNECTING}),
    Phase.NOT_MODIFIED: frozenset({Phase.SETTLED}),
    Phase.COMPLETE: frozenset({Phase.SETTLED}),
    Phase.FAILED: frozenset({Phase.SETTLED}),
    Phase.SETTLED: frozenset(),
}

#: Phases in which body bytes arrive.
RECEIVING = frozenset({Phase.SPOOLING, Phase.IN_MEMORY, Phase.HELD_BACK})
#: Phases in which the body goes on in memory.
MEMORY = frozenset({Phase.IN_MEMORY, Phase.HELD_BACK})
#: Phases after which no byte will arrive.
ENDED = frozenset({Phase.NOT_MODIFIED, Phase.COMPLETE, Phase.FAILED, Phase.SETTLED})


class IllegalTransition(Exception):
    """
    A download was asked to move to a phase it cannot reach from its own.
    """

    def __init__(self, current: Phase, wanted: Phase | str):
        self.current = current
        self.wanted = wanted
        name = wanted.name if isinstance(wanted, Phase) else wanted
        super().__init__(f"a download cannot go from {current.name} to {name}")
