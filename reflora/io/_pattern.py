"""PEFT's rank_pattern / alpha_pattern matching, in time linear in the module path.

PEFT (``peft.utils.other.get_pattern_key``) picks, for a module path m, the
first key p of the pattern dict with ``re.match(rf"(.*\\.)?({p})$", m)``.
Python's ``re`` backtracks, so a hostile key such as ``(a+)+`` against a path
of 32 a's and a '!' takes longer than the age of the universe.

reflora keeps PEFT's semantics and bounds the work: the same pattern string is
parsed by Python's own regex parser (``re._parser``), turned into a Thompson
NFA, and run as a set of states (one pass over m, at most ``MAX_STATES``
states per character). For the regular constructs (literals, classes, ``.``,
groups, alternation, greedy and lazy repeats, anchors ``^ $ \\A \\Z \\b \\B``)
"is there a match" does not depend on backtracking order, so the answer is
``re``'s answer; single-character tests and anchors are delegated to ``re``
itself, so classes, categories and word boundaries mean exactly what they
mean there. Constructs whose answer does depend on the order or that cannot be
bounded (back-references, look-around, conditionals, atomic groups,
possessive repeats, inline flags) are refused with a FormatError naming the
key; so is a key whose NFA would exceed ``MAX_STATES`` (e.g. ``a{1000}{1000}``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from re import _compiler as sre_compile  # noqa: PLC2701 - the regex parser/compiler re itself uses
from re import _constants as C  # noqa: N812, PLC2701
from re import _parser as sre_parse  # noqa: PLC2701
from typing import Any, Callable, Mapping

__all__ = ["MAX_STATES", "check_pattern", "pattern_key"]

#: The largest NFA a pattern may compile to (states); each character of a path costs at most this many steps.
MAX_STATES = 20_000

_UNSUPPORTED = {
    C.GROUPREF: "a back-reference", C.GROUPREF_EXISTS: "a conditional group", C.ASSERT: "a look-around",
    C.ASSERT_NOT: "a look-around", C.ATOMIC_GROUP: "an atomic group", C.POSSESSIVE_REPEAT: "a possessive repeat",
}


class PatternError(ValueError):
    """A pattern reflora refuses to match (the caller turns it into a FormatError naming the file)."""


class _NFA:
    """States: ("char", test, next) | ("zero", test, next) | ("split", [next, ...]) | ("match",)."""

    def __init__(self, state: sre_parse.State) -> None:
        self.states: list[list] = []
        self.state = state

    def new(self, *node: Any) -> int:
        if len(self.states) >= MAX_STATES:
            raise PatternError(f"compiles to more than {MAX_STATES} NFA states")
        self.states.append(list(node))
        return len(self.states) - 1

    def single(self, node: tuple) -> Callable[[str, int], bool]:
        """re's own test for one node (a character class or an anchor), compiled on its own."""
        sub = sre_parse.SubPattern(self.state, [node])
        compiled = sre_compile.compile(sub, self.state.flags)
        return lambda s, i: compiled.match(s, i) is not None

    def build(self, items: Any, nxt: int) -> int:
        """Return the entry state of ``items`` followed by state ``nxt`` (built back to front)."""
        for op, av in reversed(list(items)):
            nxt = self.node(op, av, nxt)
        return nxt

    def node(self, op: Any, av: Any, nxt: int) -> int:
        if op in _UNSUPPORTED:
            raise PatternError(f"uses {_UNSUPPORTED[op]}, which reflora does not match (its cost has no bound)")
        if op is C.LITERAL:
            ch = chr(av)
            return self.new("char", lambda s, i: s[i] == ch, nxt)
        if op in (C.NOT_LITERAL, C.ANY, C.IN):
            return self.new("char", self.single((op, av)), nxt)
        if op is C.AT:
            return self.new("zero", self.single((op, av)), nxt)
        if op is C.SUBPATTERN:
            _group, add_flags, del_flags, body = av
            if add_flags or del_flags:
                raise PatternError("sets inline flags such as (?i:...), which reflora does not match")
            return self.build(body, nxt)
        if op is C.BRANCH:
            return self.new("split", [self.build(alt, nxt) for alt in av[1]])
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            lo, hi, body = av
            if hi is C.MAXREPEAT:  # body* : a loop state that enters body or leaves
                loop = self.new("split", [])
                self.states[loop][1] = [self.build(body, loop), nxt]
                entry = loop
            else:
                entry = nxt
                for _ in range(hi - lo):  # optional copies: (body (body ...)?)?
                    entry = self.new("split", [self.build(body, entry), nxt])
            for _ in range(lo):
                entry = self.build(body, entry)
            return entry
        raise PatternError(f"uses the construct {op}, which reflora does not match")


@lru_cache(maxsize=256)
def _compile(pattern: str) -> tuple[list[list], int]:
    """(states, start) for PEFT's full expression around ``pattern``; PatternError / re.error if refused."""
    full = rf"(.*\.)?({pattern})$"  # exactly the string PEFT hands to re.match
    try:  # re's parser and the NFA builder recurse once per nesting level: a deep key is refused, not a crash
        re.compile(full)  # re's own syntax errors first
        parsed = sre_parse.parse(full)
        if parsed.state.flags & ~(C.SRE_FLAG_UNICODE):
            raise PatternError("sets global flags such as (?i), which reflora does not match")
        nfa = _NFA(parsed.state)
        match = nfa.new("match")
        start = nfa.build(parsed, match)
    except RecursionError:
        raise PatternError("nests groups too deeply for Python's regex parser (RecursionError)") from None
    return nfa.states, start


def check_pattern(pattern: str) -> None:
    """Raise PatternError (or re.error) if ``pattern`` is not a key reflora can match in bounded time."""
    _compile(pattern)


def _matches(pattern: str, path: str) -> bool:
    """``re.match(rf"(.*\\.)?({pattern})$", path) is not None``, in O(len(path) * states) steps."""
    states, start = _compile(pattern)
    n = len(path)

    def closure(todo: list[int], pos: int) -> set[int]:
        seen: set[int] = set()
        while todo:
            k = todo.pop()
            if k in seen:
                continue
            seen.add(k)
            st = states[k]
            if st[0] == "split":
                todo.extend(st[1])
            elif st[0] == "zero" and st[1](path, pos):
                todo.append(st[2])
        return seen

    current = closure([start], 0)
    for pos in range(n + 1):
        if any(states[k][0] == "match" for k in current):
            return True  # re.match: a match need not reach the end (the pattern's own $ decides)
        if pos == n or not current:
            return False
        step = [states[k][2] for k in current if states[k][0] == "char" and states[k][1](path, pos)]
        current = closure(step, pos + 1)
    return False


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's get_pattern_key: the first key p with re.match(rf"(.*\\.)?({p})$", module), or None.

    Raises:
      PatternError: a key reflora refuses (see the module docstring).
    """
    for p in patterns:
        if _matches(p, module):
            return p
    return None
