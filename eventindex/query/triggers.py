"""Trigger queries: count the events passing an expression of trigger names, and overlaps.

An expression combines trigger names with ``AND``, ``OR``, ``NOT`` (or ``&``,
``|``, ``!``) and parentheses: ``HLT_e26_lhtight_nod0_ivarloose OR
(HLT_mu26_ivarmedium AND NOT L1_XE50)``. An L1 item means its after-veto bit
(what passed L1); ``L1_EM22VHI:TBP`` and ``:TAP`` name the before- and
after-prescale bits. Names are decoded per run with the menus of that run's
super master key (SMK): a trigger absent from a run's menu passed no event of
that run, a name in no stored menu at all is an error, and so is a run whose
SMK has no stored menu.

Answers come from the inverted trigger index (``trigger_index``): per master
file and (run, SMK), the expression is evaluated on roaring bitmaps (OR is a
union, AND an intersection, AND NOT a difference, NOT the difference from the
group's rows) and the count is a cardinality. A master file without an index
is indexed in memory on first use, so answers never depend on whether the
Indexer has run. Loaded bitmaps are cached, and the catalog's file list is
re-read when the catalog's change token says it changed, asked at most once
per ``refresh_seconds``.
"""

from __future__ import annotations

import fnmatch
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from pyroaring import BitMap, FrozenBitMap

from catalog.base import Catalog
from catalog.model import FileKind, TagFile
from eventindex.errors import NotFoundError
from eventindex.query.trigger_index import (
    INDEX_COLUMNS,
    INDEX_PART,
    MASK_CODES,
    MASK_NAMES,
    MASTER_ATTRIBUTE,
    LoadedIndex,
    build_trigger_index,
    mask_matrix,
)
from eventindex.records.schema import TriggerMenu
from eventindex.storage import MapFileReader

RUN_NUMBER_MAX = 2**32 - 1
AnyBitMap = BitMap | FrozenBitMap
_NONE = FrozenBitMap()
L1_MASKS = {"TBP": "l1_tbp", "TAP": "l1_tap", "TAV": "l1_tav"}


# -- errors --------------------------------------------------------------------


class TriggerExpressionError(ValueError):
    """A malformed expression or an unknown trigger name; names the token and where it is."""

    def __init__(self, message: str, token: str, position: int) -> None:
        super().__init__(message)
        self.token = token
        self.position = position


class UnknownTriggerError(TriggerExpressionError):
    """A trigger name that no stored menu has (or a qualifier it cannot take)."""


class TriggerMenuMissingError(NotFoundError):
    """A run's SMK has no stored menu of a level the expression needs."""


# -- parsing -------------------------------------------------------------------


@dataclass(frozen=True)
class TriggerName:
    """One trigger in an expression; ``position`` is its 1-based column in the text."""

    name: str
    qualifier: str | None
    position: int

    @property
    def text(self) -> str:
        return f"{self.name}:{self.qualifier}" if self.qualifier else self.name


@dataclass(frozen=True)
class Not:
    operand: Expression


@dataclass(frozen=True)
class And:
    operands: tuple[Expression, ...]


@dataclass(frozen=True)
class Or:
    operands: tuple[Expression, ...]


Expression = TriggerName | Not | And | Or

_TOKEN = re.compile(
    r"[ \t\r\n]*(?:(?P<open>\()|(?P<close>\))|(?P<and>&&?)|(?P<or>\|\|?)|(?P<not>!)"
    r"|(?P<name>[A-Za-z0-9_][A-Za-z0-9_.\-+]*(?::[A-Za-z]+)?))"
)
_SPACE = " \t\r\n"
_WORDS = {"AND": "and", "OR": "or", "NOT": "not"}
# Deeper nesting is refused (and Python's recursion limit is never reached).
MAX_NESTING = 32
_TOKEN_TEXT = {"open": "(", "close": ")", "end": "end of expression"}


@dataclass(frozen=True)
class _Token:
    kind: str  # open, close, and, or, not, name, end
    text: str
    position: int  # 1-based


def _tokens(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        rest = text[position:]
        if rest.strip(_SPACE) == "":
            break
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            column = position + len(rest) - len(rest.lstrip(_SPACE)) + 1
            bad = text[column - 1]
            raise TriggerExpressionError(
                f"unexpected character {bad!r} at position {column} of the trigger expression",
                bad,
                column,
            )
        kind = match.lastgroup or ""
        value = match.group(kind)
        column = match.start(kind) + 1
        if kind == "name" and value.upper() in _WORDS:
            kind = _WORDS[value.upper()]
        tokens.append(_Token(kind, value, column))
        position = match.end()
    tokens.append(_Token("end", "", len(text) + 1))
    return tokens


class _Parser:
    """Recursive descent: or := and (OR and)*; and := unary (AND unary)*;
    unary := NOT unary | name | '(' or ')'."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.index = 0
        self.depth = 0

    def _peek(self) -> _Token:
        return self.tokens[self.index]

    def _take(self) -> _Token:
        token = self.tokens[self.index]
        self.index += 1
        return token

    def _fail(self, token: _Token, expected: str) -> TriggerExpressionError:
        found = "the end of the expression" if token.kind == "end" else repr(token.text)
        return TriggerExpressionError(
            f"expected {expected} at position {token.position} of the trigger expression, "
            f"found {found}",
            token.text,
            token.position,
        )

    def parse(self) -> Expression:
        if self._peek().kind == "end":
            raise TriggerExpressionError("the trigger expression is empty", "", 1)
        expression = self._or()
        token = self._peek()
        if token.kind != "end":
            raise self._fail(token, "AND, OR or the end of the expression")
        return expression

    def _or(self) -> Expression:
        operands = [self._and()]
        while self._peek().kind == "or":
            self._take()
            operands.append(self._and())
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def _and(self) -> Expression:
        operands = [self._unary()]
        while self._peek().kind == "and":
            self._take()
            operands.append(self._unary())
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def _unary(self) -> Expression:
        token = self._take()
        if token.kind == "not":
            return Not(self._unary())
        if token.kind == "open":
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise TriggerExpressionError(
                    f"parentheses nested deeper than {MAX_NESTING} at position {token.position}",
                    token.text,
                    token.position,
                )
            inner = self._or()
            self.depth -= 1
            closing = self._peek()
            if closing.kind != "close":
                found = "the end" if closing.kind == "end" else repr(closing.text)
                raise TriggerExpressionError(
                    f"missing ')' for the '(' at position {token.position} of the trigger "
                    f"expression (found {found} at position {closing.position})",
                    closing.text,
                    closing.position,
                )
            self._take()
            return inner
        if token.kind == "name":
            name, _, qualifier = token.text.partition(":")
            if qualifier and qualifier.upper() not in L1_MASKS:
                raise TriggerExpressionError(
                    f"unknown mask {qualifier!r} in {token.text!r} at position {token.position}"
                    f" (use {', '.join(L1_MASKS)})",
                    token.text,
                    token.position,
                )
            return TriggerName(name, qualifier.upper() or None, token.position)
        raise self._fail(token, "a trigger name, NOT or '('")


def parse_expression(text: str) -> Expression:
    """Parse a trigger expression; ``TriggerExpressionError`` names the bad token."""
    return _Parser(text).parse()


def expression_pattern(nesting: int = 3) -> str:
    """A regular expression for expressions of trigger names containing an underscore (as
    menus spell them: ``L1_...``, ``HLT_...``), upper-case ``AND``/``OR``/``NOT`` or
    ``&``, ``|``, ``!``, and parentheses nested at most ``nesting`` deep. Everything it
    matches parses (a subset of the grammar, regular so a JSON schema can state it)."""
    space = "[ \\t]"
    name = r"[A-Za-z0-9]+_[A-Za-z0-9_.+\-]*(?::(?:TBP|TAP|TAV))?"
    negations = f"(?:!{space}*|NOT{space}+)*"
    operator = f"(?:{space}*(?:&&?|\\|\\|?){space}*|{space}+(?:AND|OR){space}+)"
    expression = f"{negations}{name}(?:{operator}{negations}{name})*"
    for _ in range(nesting):
        atom = f"{negations}(?:{name}|\\({space}*{expression}{space}*\\))"
        expression = f"{atom}(?:{operator}{atom})*"
    return f"^{space}*{expression}{space}*$"


def trigger_names(expression: Expression) -> list[TriggerName]:
    """The trigger names of an expression, in the order they appear."""
    if isinstance(expression, TriggerName):
        return [expression]
    if isinstance(expression, Not):
        return trigger_names(expression.operand)
    return [name for operand in expression.operands for name in trigger_names(operand)]


def parse_run_range(text: str) -> tuple[int, int]:
    """``A-B`` or ``A`` as an inclusive run range; ``ValueError`` naming the text if bad."""
    first, sep, last = text.strip().partition("-")
    try:
        low = int(first)
        high = int(last) if sep else low
    except ValueError:
        raise ValueError(f"run range {text!r}: expected RUN or FIRST-LAST") from None
    if not 0 <= low <= high <= RUN_NUMBER_MAX:
        raise ValueError(f"run range {text!r}: need 0 <= FIRST <= LAST <= {RUN_NUMBER_MAX}")
    return low, high


# -- menus ---------------------------------------------------------------------


class MenuBook:
    """The catalog's trigger menus, by (SMK, level) and by trigger name, re-read when a
    key is missing and the catalog changed (asked at most once per ``refresh_seconds``)."""

    def __init__(self, catalog: Catalog, refresh_seconds: float = 1.0) -> None:
        self.catalog = catalog
        self.refresh_seconds = refresh_seconds
        self._menus: dict[tuple[int, str], dict[str, int]] = {}
        self._levels: dict[str, set[str]] = {}
        self._loaded_at = float("-inf")
        self._token: Hashable = None
        self._lock = threading.Lock()

    def _load(self, token: Hashable = None) -> None:
        # The token first: a menu stored meanwhile makes the next one differ.
        token = self.catalog.change_token() if token is None else token
        menus: dict[tuple[int, str], dict[str, int]] = {}
        levels: dict[str, set[str]] = {}
        for menu in self.catalog.list_trigger_menus():
            menus[(menu.key, menu.level)] = {name: bit for bit, name in menu.bits.items()}
            for name in menu.bits.values():
                levels.setdefault(name, set()).add(menu.level)
        self._menus, self._levels, self._token = menus, levels, token
        self._loaded_at = time.monotonic()

    def _fresh(self, force: bool = False) -> None:
        with self._lock:
            if self._loaded_at == float("-inf"):
                self._load()
            elif force and time.monotonic() - self._loaded_at >= self.refresh_seconds:
                token = self.catalog.change_token()
                if token == self._token:
                    self._loaded_at = time.monotonic()  # unchanged: nothing to list
                else:
                    self._load(token)

    def levels_of(self, name: TriggerName) -> set[str]:
        """Which menu levels know the trigger; ``TriggerExpressionError`` if none does."""
        self._fresh()
        levels = self._levels.get(name.name)
        if levels is None:
            self._fresh(force=True)
            levels = self._levels.get(name.name)
        if levels is None:
            raise UnknownTriggerError(
                f"unknown trigger {name.name!r} at position {name.position}: "
                "no stored trigger menu has it",
                name.text,
                name.position,
            )
        if name.qualifier and "L1" not in levels:
            raise UnknownTriggerError(
                f"{name.text!r} at position {name.position}: :{name.qualifier} applies to L1 "
                "items only",
                name.text,
                name.position,
            )
        return levels

    def bits(self, smk: int, level: str, where: str) -> dict[str, int]:
        """Name -> bit of one menu; ``TriggerMenuMissingError`` naming ``where`` if absent."""
        self._fresh()
        menu = self._menus.get((smk, level))
        if menu is None:
            self._fresh(force=True)
            menu = self._menus.get((smk, level))
        if menu is None:
            raise TriggerMenuMissingError(
                f"no {level} trigger menu is stored for SMK {smk}, needed by {where}: "
                "store it with Catalog.put_trigger_menu"
            )
        return menu

    def put(self, menu: TriggerMenu) -> None:
        """Store a menu in the catalog and see it at once."""
        self.catalog.put_trigger_menu(menu)
        self._fresh(force=True)


# -- answers -------------------------------------------------------------------


@dataclass
class RunCount:
    run_number: int
    smk: int
    events: int = 0
    passed: int = 0


@dataclass
class TriggerCount:
    """Events passing ``expression`` over the matched datasets' rows in the run range."""

    expression: str
    dataset: str
    run_min: int
    run_max: int
    passed: int = 0
    events: int = 0
    datasets: int = 0
    files: int = 0
    unindexed_files: int = 0
    runs: dict[int, RunCount] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "expression": self.expression,
            "dataset": self.dataset,
            "run_min": self.run_min,
            "run_max": self.run_max,
            "passed": self.passed,
            "events": self.events,
            "fraction": self.passed / self.events if self.events else 0.0,
            "datasets": self.datasets,
            "files": self.files,
            "unindexed_files": self.unindexed_files,
            "runs": [
                {"run_number": r.run_number, "smk": r.smk, "events": r.events, "passed": r.passed}
                for r in sorted(self.runs.values(), key=lambda r: (r.run_number, r.smk))
            ],
            "seconds": round(self.seconds, 6),
        }


@dataclass
class TriggerOverlap:
    """``matrix[i][j]``: events passing both ``expressions[i]`` and ``expressions[j]``."""

    expressions: list[str]
    dataset: str
    run_min: int
    run_max: int
    matrix: list[list[int]]
    events: int = 0
    files: int = 0
    unindexed_files: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "expressions": self.expressions,
            "dataset": self.dataset,
            "run_min": self.run_min,
            "run_max": self.run_max,
            "events": self.events,
            "counts": [self.matrix[i][i] for i in range(len(self.expressions))],
            "matrix": self.matrix,
            "files": self.files,
            "unindexed_files": self.unindexed_files,
            "seconds": round(self.seconds, 6),
        }


# -- evaluation ------------------------------------------------------------------


@dataclass(frozen=True)
class _Leaf:
    mask: int
    bit: int


def _evaluate(
    expression: Expression, leaf: Callable[[TriggerName], AnyBitMap], universe: AnyBitMap
) -> AnyBitMap:
    if isinstance(expression, TriggerName):
        return leaf(expression)
    if isinstance(expression, Not):
        return universe - _evaluate(expression.operand, leaf, universe)
    if isinstance(expression, Or):
        return BitMap.union(*(_evaluate(o, leaf, universe) for o in expression.operands))
    # AND: intersect the positive operands, then take away the negated ones.
    positive = [_evaluate(o, leaf, universe) for o in expression.operands if not isinstance(o, Not)]
    negative = [
        _evaluate(o.operand, leaf, universe) for o in expression.operands if isinstance(o, Not)
    ]
    result = BitMap.intersection(*positive) if positive else universe
    if negative:
        result = result - BitMap.union(*negative)
    return result


def _leaf_reader(
    loaded: LoadedIndex, run_number: int, smk: int, leaves: dict[TriggerName, _Leaf | None]
) -> Callable[[TriggerName], AnyBitMap]:
    """The bitmap of each trigger name in one (run, SMK) group of one file."""

    def leaf(name: TriggerName) -> AnyBitMap:
        found = leaves[name]
        if found is None:
            return _NONE
        return loaded.bitmap(run_number, smk, found.mask, found.bit)

    return leaf


@dataclass
class _Scope:
    pattern: str
    run_min: int
    run_max: int
    files: list[tuple[TagFile, TagFile | None]]  # (master, its trigger index or None)

    @property
    def datasets(self) -> int:
        return len({master.dataset for master, _ in self.files})


class TriggerIndex:
    """Trigger counts and overlaps over the catalog's master files, from their indexes.

    Thread-safe; share one per process. ``cache_bytes`` bounds the serialised
    bitmaps kept in memory (least recently used indexes are dropped).
    """

    def __init__(
        self,
        catalog: Catalog,
        *,
        refresh_seconds: float = 1.0,
        cache_bytes: int = 2 * 2**30,
    ) -> None:
        self.catalog = catalog
        self.menus = MenuBook(catalog, refresh_seconds)
        self.refresh_seconds = refresh_seconds
        self.cache_bytes = cache_bytes
        self._files: list[TagFile] = []
        self._indexes: dict[str, TagFile] = {}
        self._listed_at = float("-inf")
        self._token: Hashable = None
        self._cache: OrderedDict[str, LoadedIndex] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    # -- plan ----------------------------------------------------------------
    def _listing(self) -> tuple[list[TagFile], dict[str, TagFile]]:
        with self._lock:
            if time.monotonic() - self._listed_at >= self.refresh_seconds:
                # Listed again only if the catalog changed since (the token read first).
                token = self.catalog.change_token()
                if token != self._token:
                    entries = self.catalog.list_tagfiles(kinds=[FileKind.MASTER, FileKind.INDEX])
                    self._files = [e for e in entries if e.kind is FileKind.MASTER]
                    self._indexes = {
                        e.attributes[MASTER_ATTRIBUTE]: e
                        for e in entries
                        if e.kind is FileKind.INDEX
                        and e.part == INDEX_PART
                        and MASTER_ATTRIBUTE in e.attributes
                    }
                    self._token = token
                self._listed_at = time.monotonic()
            return self._files, self._indexes

    def refresh(self) -> None:
        """Forget the file list, so the next query re-reads the catalog."""
        with self._lock:
            self._listed_at = float("-inf")
            self._token = None

    def scope(
        self,
        dataset: str,
        *,
        collection: str | None = None,
        run_min: int | None = None,
        run_max: int | None = None,
    ) -> _Scope:
        """The master files of datasets matching the glob ``dataset`` in the run range."""
        low = 0 if run_min is None else run_min
        high = RUN_NUMBER_MAX if run_max is None else run_max
        if not 0 <= low <= high <= RUN_NUMBER_MAX:
            raise ValueError(f"run range {low}-{high}: need 0 <= first <= last <= {RUN_NUMBER_MAX}")
        if not dataset:
            raise ValueError("dataset: give a dataset name or glob pattern")
        files, indexes = self._listing()
        matched = [
            f
            for f in files
            if fnmatch.fnmatchcase(f.dataset, dataset)
            and (collection is None or f.collection == collection)
        ]
        if not matched:
            where = f" in collection {collection!r}" if collection else ""
            raise NotFoundError(f"no dataset matches {dataset!r}{where}")
        in_range = [
            (f, indexes.get(f.file_id))
            for f in matched
            if f.key_min and f.key_min[0] <= high and f.key_max[0] >= low
        ]
        return _Scope(dataset, low, high, in_range)

    # -- loading -------------------------------------------------------------
    def _load(self, master: TagFile, index: TagFile | None) -> LoadedIndex:
        cache_key = index.file_id if index is not None else f"master:{master.file_id}"
        with self._lock:
            loaded = self._cache.get(cache_key)
            if loaded is not None:
                self._cache.move_to_end(cache_key)
                return loaded
        if index is not None:
            with MapFileReader(index.uri) as reader:
                loaded = LoadedIndex(reader.read())
        else:
            with MapFileReader(master.uri) as reader:
                loaded = LoadedIndex(build_trigger_index(reader.read(list(INDEX_COLUMNS))))
        with self._lock:
            if cache_key not in self._cache:
                self._cache[cache_key] = loaded
                self._cached_bytes += loaded.nbytes
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                _, dropped = self._cache.popitem(last=False)
                self._cached_bytes -= dropped.nbytes
        return loaded

    def _groups(self, scope: _Scope) -> Iterable[tuple[TagFile, LoadedIndex, int, int]]:
        """(master, loaded index, run, SMK) of every group in the scope's run range."""
        for master, index in scope.files:
            loaded = self._load(master, index)
            for run_number, smk in sorted(loaded.groups):
                if scope.run_min <= run_number <= scope.run_max:
                    yield master, loaded, run_number, smk

    def _leaf_resolver(
        self, expressions: Sequence[Expression]
    ) -> Callable[[TagFile, int, int], dict[TriggerName, _Leaf | None]]:
        names = {n for e in expressions for n in trigger_names(e)}
        levels = {n: self.menus.levels_of(n) for n in names}
        resolved: dict[int, dict[TriggerName, _Leaf | None]] = {}

        def resolve(master: TagFile, run_number: int, smk: int) -> dict[TriggerName, _Leaf | None]:
            known = resolved.get(smk)
            if known is not None:
                return known
            where = f"run {run_number} (dataset {master.dataset})"
            leaves: dict[TriggerName, _Leaf | None] = {}
            for name in names:
                leaf: _Leaf | None = None
                if "HLT" in levels[name] and not name.qualifier:
                    bit = self.menus.bits(smk, "HLT", where).get(name.name)
                    if bit is not None:
                        leaf = _Leaf(MASK_CODES["hlt_passed"], bit)
                if leaf is None and "L1" in levels[name]:
                    bit = self.menus.bits(smk, "L1", where).get(name.name)
                    if bit is not None:
                        mask = L1_MASKS[name.qualifier or "TAV"]
                        leaf = _Leaf(MASK_CODES[mask], bit)
                leaves[name] = leaf
            resolved[smk] = leaves
            return leaves

        return resolve

    # -- queries -------------------------------------------------------------
    def count(
        self,
        expression: str,
        *,
        dataset: str,
        collection: str | None = None,
        run_min: int | None = None,
        run_max: int | None = None,
    ) -> TriggerCount:
        """Events of the matched datasets passing ``expression``, per run and in total."""
        start = time.perf_counter()
        scope = self.scope(dataset, collection=collection, run_min=run_min, run_max=run_max)
        parsed = parse_expression(expression)
        resolve = self._leaf_resolver([parsed])
        answer = TriggerCount(
            expression,
            dataset,
            scope.run_min,
            scope.run_max,
            datasets=scope.datasets,
            files=len(scope.files),
            unindexed_files=sum(index is None for _, index in scope.files),
        )
        for master, loaded, run_number, smk in self._groups(scope):
            leaves = resolve(master, run_number, smk)
            universe = loaded.events(run_number, smk)

            leaf = _leaf_reader(loaded, run_number, smk, leaves)
            passed = len(_evaluate(parsed, leaf, universe))
            run = answer.runs.setdefault(run_number, RunCount(run_number, smk))
            run.events += len(universe)
            run.passed += passed
            answer.events += len(universe)
            answer.passed += passed
        answer.seconds = time.perf_counter() - start
        return answer

    def overlap(
        self,
        expressions: Sequence[str],
        *,
        dataset: str,
        collection: str | None = None,
        run_min: int | None = None,
        run_max: int | None = None,
    ) -> TriggerOverlap:
        """The N x N matrix of events passing both expression i and expression j."""
        start = time.perf_counter()
        if not expressions:
            raise ValueError("give at least one trigger")
        scope = self.scope(dataset, collection=collection, run_min=run_min, run_max=run_max)
        parsed = [parse_expression(e) for e in expressions]
        resolve = self._leaf_resolver(parsed)
        size = len(parsed)
        matrix = [[0] * size for _ in range(size)]
        answer = TriggerOverlap(
            list(expressions),
            dataset,
            scope.run_min,
            scope.run_max,
            matrix,
            files=len(scope.files),
            unindexed_files=sum(index is None for _, index in scope.files),
        )
        for master, loaded, run_number, smk in self._groups(scope):
            leaves = resolve(master, run_number, smk)
            universe = loaded.events(run_number, smk)

            leaf = _leaf_reader(loaded, run_number, smk, leaves)
            bitmaps = [_evaluate(p, leaf, universe) for p in parsed]
            answer.events += len(universe)
            for i, left in enumerate(bitmaps):
                if not left:
                    continue
                matrix[i][i] += len(left)
                for j in range(i + 1, size):
                    both = left.intersection_cardinality(bitmaps[j])
                    matrix[i][j] += both
                    matrix[j][i] += both
        answer.seconds = time.perf_counter() - start
        return answer

    def selection(
        self, expression: str, *, run_min: int | None = None, run_max: int | None = None
    ) -> TriggerSelection:
        """The rows passing ``expression`` in a run range, file by file (for selects);
        ``TriggerExpressionError`` naming the token at once if the expression is bad."""
        low = 0 if run_min is None else run_min
        high = RUN_NUMBER_MAX if run_max is None else run_max
        return TriggerSelection(self, expression, low, high)


# -- selecting events --------------------------------------------------------------

RowArray = npt.NDArray[np.uint32]
BoolArray = npt.NDArray[np.bool_]
_NO_ROWS: RowArray = np.zeros(0, dtype=np.uint32)


def _evaluate_rows(
    expression: Expression, leaf: Callable[[TriggerName], BoolArray], universe: BoolArray
) -> BoolArray:
    """``_evaluate`` over boolean row arrays: NOT is taken against ``universe``."""
    if isinstance(expression, TriggerName):
        return leaf(expression)
    if isinstance(expression, Not):
        return universe & ~_evaluate_rows(expression.operand, leaf, universe)
    values = [_evaluate_rows(o, leaf, universe) for o in expression.operands]
    combined: BoolArray = (np.logical_or if isinstance(expression, Or) else np.logical_and).reduce(
        values
    )
    return combined


def _bit_column(matrix: npt.NDArray[np.uint8], bit: int) -> BoolArray:
    """Per row: is ``bit`` set (bit i = byte i // 8, bit i % 8; absent bytes are zeros)."""
    byte = bit >> 3
    if byte >= matrix.shape[1]:
        return np.zeros(matrix.shape[0], dtype=bool)
    return ((matrix[:, byte] >> (bit & 7)) & 1).astype(bool)


class TriggerSelection:
    """The rows of master files passing one expression, in a run range: what
    ``Reader.select`` reads when a trigger expression is given.

    Names are checked when the selection is made (``TriggerExpressionError``), so a
    request can be refused before anything is read; a run whose SMK has no menu
    fails when a file holding it is reached (``TriggerMenuMissingError``). A file
    with a stored index is answered from its bitmaps (cached by the
    ``TriggerIndex``); a file without one (a TagFile written after the Indexer ran)
    by evaluating the expression on the mask columns it needs, row group by row group.
    """

    def __init__(self, index: TriggerIndex, expression: str, run_min: int, run_max: int) -> None:
        if not 0 <= run_min <= run_max <= RUN_NUMBER_MAX:
            raise ValueError(
                f"run range {run_min}-{run_max}: need 0 <= first <= last <= {RUN_NUMBER_MAX}"
            )
        self.index = index
        self.expression = expression
        self.run_min = run_min
        self.run_max = run_max
        self.parsed = parse_expression(expression)
        self._resolve = index._leaf_resolver([self.parsed])  # checks every name now
        self._masks = self._mask_columns()

    def _mask_columns(self) -> list[str]:
        """The mask columns the expression can read (what ``_leaf_resolver`` may pick)."""
        needed: set[str] = set()
        for name in trigger_names(self.parsed):
            levels = self.index.menus.levels_of(name)
            if "HLT" in levels and not name.qualifier:
                needed.add("hlt_passed")
            if "L1" in levels:
                needed.add(L1_MASKS[name.qualifier or "TAV"])
        return sorted(needed)

    def rows(self, master: TagFile) -> RowArray:
        """Ascending row ordinals of ``master`` in the run range that pass the expression."""
        if not master.key_min or master.key_min[0] > self.run_max:
            return _NO_ROWS
        if master.key_max and master.key_max[0] < self.run_min:
            return _NO_ROWS
        _, indexes = self.index._listing()
        stored = indexes.get(master.file_id)
        if stored is not None:
            return self._rows_from_index(master, self.index._load(master, stored))
        return self._rows_from_masks(master)

    def _rows_from_index(self, master: TagFile, loaded: LoadedIndex) -> RowArray:
        passed: list[AnyBitMap] = []
        for run_number, smk in sorted(loaded.groups):
            if not self.run_min <= run_number <= self.run_max:
                continue
            leaves = self._resolve(master, run_number, smk)
            leaf = _leaf_reader(loaded, run_number, smk, leaves)
            passed.append(_evaluate(self.parsed, leaf, loaded.events(run_number, smk)))
        if not passed:
            return _NO_ROWS
        union = BitMap.union(*passed) if len(passed) > 1 else passed[0]
        return np.frombuffer(union.to_array(), dtype=np.uint32)

    def _rows_from_masks(self, master: TagFile) -> RowArray:
        pieces: list[RowArray] = []
        offset = 0
        with MapFileReader(master.uri) as reader:
            for table in reader.scan(columns=["run_number", "smk", *self._masks]):
                selected = self._passing(master, table)
                pieces.append((np.flatnonzero(selected) + offset).astype(np.uint32))
                offset += table.num_rows
        return np.concatenate(pieces) if pieces else _NO_ROWS

    def _passing(self, master: TagFile, table: pa.Table) -> BoolArray:
        """Per row of ``table`` (a piece of a master file): in the run range and passing."""
        runs = table.column("run_number").to_numpy()
        smks = table.column("smk").to_numpy()
        in_range = (runs >= self.run_min) & (runs <= self.run_max)
        result = np.zeros(table.num_rows, dtype=bool)
        if not in_range.any():
            return result
        matrices = {name: mask_matrix(table.column(name)) for name in self._masks}
        pairs = np.unique(np.stack([runs[in_range], smks[in_range]], axis=1), axis=0)
        for run_number, smk in pairs.tolist():
            leaves = self._resolve(master, run_number, smk)
            group = in_range & (runs == run_number) & (smks == smk)

            def leaf(
                name: TriggerName, leaves: dict[TriggerName, _Leaf | None] = leaves
            ) -> BoolArray:
                found = leaves[name]
                if found is None:
                    return np.zeros(table.num_rows, dtype=bool)
                return _bit_column(matrices[MASK_NAMES[found.mask]], found.bit)

            result |= group & _evaluate_rows(self.parsed, leaf, group)
        return result
