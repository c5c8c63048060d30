"""Why objects are not programmed: problems (invalid: logged as warnings and counted) and skips
(valid but not ours to program, such as a headless Service: logged at debug level).

One report per object, replaced when the object changes and dropped when it is fixed or gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyproxy.model.keys import ObjectKey
from pyproxy.model.objects import Problem
from pyproxy.model.parse import Invalid, Skipped, object_key


@dataclass(frozen=True, slots=True)
class Skip:
    """A valid object that is not ours to program, with why (logged at debug level)."""

    kind: str
    key: ObjectKey
    reason: str


def why(err: BaseException) -> str:
    """An exception as one short line for a problem report."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def problem_of(kind: str, obj: Any, err: Exception) -> Problem:
    """A problem report that names the object as well as it can be named."""
    try:
        namespace, name = object_key(obj)
    except Invalid:
        namespace, name = "", "<no name>"
    return Problem(kind, "" if kind == "Node" else namespace, name, str(err))


class Reports:
    """The current problem or skip of each object, by kind and key.

    Two kinds of object have no key to file a report under, and each gets a slot of its own
    instead of a made-up key: an object without a usable name (the last such report per kind;
    a relist starts them afresh), and our Node (there is one)."""

    def __init__(self) -> None:
        self._problems: dict[tuple[str, ObjectKey], Problem] = {}
        self._skips: dict[tuple[str, ObjectKey], Skip] = {}
        self._nameless: dict[str, Problem] = {}
        self.node: Problem | None = None
        """Our Node's problem, if its object is invalid (NodePorts then use the interfaces)."""

    def record(self, kind: str, key: ObjectKey, err: Exception, obj: Any) -> None:
        """``obj`` was not taken: a Skipped error is a skip, anything else a problem."""
        if isinstance(err, Skipped):
            self._skips[(kind, key)] = Skip(kind, key, str(err))
            self._problems.pop((kind, key), None)
        else:
            self._problems[(kind, key)] = problem_of(kind, obj, err)
            self._skips.pop((kind, key), None)

    def nameless(self, kind: str, obj: Any, err: Exception) -> None:
        """An object of ``kind`` that cannot be named (so cannot be stored) was not taken."""
        self._nameless[kind] = problem_of(kind, obj, err)

    def clear(self, kind: str, key: ObjectKey) -> None:
        """The object is fine now, or gone."""
        self._problems.pop((kind, key), None)
        self._skips.pop((kind, key), None)

    def start_relist(self, kind: str) -> None:
        """A relist of ``kind`` begins: reports of nameless objects cannot be matched to the new
        list, so they start afresh (the relist reports them again if they are still there)."""
        self._nameless.pop(kind, None)

    def keep_only(self, kind: str, keys: set[ObjectKey]) -> None:
        """After a relist: reports of objects of ``kind`` that are no longer listed must not linger."""
        for pkey in [p for p in self._problems if p[0] == kind and p[1] not in keys]:
            del self._problems[pkey]

    @property
    def problems(self) -> tuple[Problem, ...]:
        extra = [self.node] if self.node is not None else []
        return tuple([*self._problems.values(), *self._nameless.values(), *extra])

    @property
    def skips(self) -> tuple[Skip, ...]:
        return tuple(self._skips.values())
