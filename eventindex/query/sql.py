"""The query language: a safe subset of SQL, parsed with sqlglot and compiled to a plan.

Supported::

    SELECT col, alias = col AS alias, COUNT(*), COUNT(col), SUM/AVG/MIN/MAX(col), or *
    FROM   table          -- a dataset, a collection, or a dataset pattern with *;
                          -- quote names that hold dots and digits in double quotes
    WHERE  comparisons (= != <> < <= > >=) of columns and literals, AND / OR / NOT,
           col [NOT] IN (literals), col [NOT] BETWEEN a AND b, col IS [NOT] NULL,
           and a cone: CONE(ra, dec, ra0, dec0, radius_deg)
           or, as Qserv spells it, scisql_s2PtInCircle(ra, dec, ra0, dec0, radius_deg) = 1
    GROUP BY columns    ORDER BY output columns [ASC|DESC]    LIMIT n

The cone uses the exact great-circle (haversine) distance. Everything else (joins,
subqueries, UNION, DISTINCT, HAVING, window functions, unknown functions, unknown
tables or columns, comparisons of mismatched types) is refused with a ``SqlError``
saying what is not supported. Nothing is ever pasted into a string: the plan is a
condition tree (also a ``pyarrow.compute`` filter expression), a projection and
partial aggregates that are computed per unit and merged across units, so one pass
over a table's units answers the query. ``feed_unit`` evaluates many plans on one
decoded unit at once, with numpy, block by block, sharing column conversions,
conditions and group numbers between them (Arrow's kernels where numpy cannot be
exact).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlglot
from numpy.typing import NDArray
from sqlglot import exp
from sqlglot.errors import SqlglotError

from catalog.base import Catalog
from catalog.model import Key
from eventindex.errors import EventIndexError, NotFoundError
from eventindex.query.tables import Cone, ScanTable, resolve_table

CONE_FUNCTIONS = ("cone", "scisql_s2ptincircle")
AGGREGATES: dict[type[exp.Expression], str] = {
    exp.Count: "count",
    exp.Sum: "sum",
    exp.Avg: "avg",
    exp.Min: "min",
    exp.Max: "max",
}
# Above this many key combinations an IN list stops narrowing the key ranges.
MAX_KEY_BOUNDS = 1000
_COMPARISONS: dict[type[exp.Expression], str] = {
    exp.EQ: "equal",
    exp.NEQ: "not_equal",
    exp.GT: "greater",
    exp.GTE: "greater_equal",
    exp.LT: "less",
    exp.LTE: "less_equal",
}
_FLIPPED = {
    "equal": "equal",
    "not_equal": "not_equal",
    "greater": "less",
    "greater_equal": "less_equal",
    "less": "greater",
    "less_equal": "greater_equal",
}
_DEG = math.pi / 180.0

Literal = int | float | str | bool


class SqlError(ValueError, EventIndexError):
    """A query outside the supported subset, or wrong for its table (a ``ValueError``
    first, so the web service's handler makes it a 422, and a project error).

    ``code`` says which: ``syntax``, ``unsupported``, ``unknown_table``,
    ``unknown_column``, ``type_error`` or ``too_many_rows``.
    """

    def __init__(self, message: str, code: str = "unsupported") -> None:
        super().__init__(message)
        self.code = code


class ResultTooLargeError(SqlError):
    """A query's answer has more rows than the configured limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the result has more than {limit} rows (the max_result_rows limit): "
            "add a LIMIT, a narrower WHERE, or aggregate",
            "too_many_rows",
        )


@dataclass(frozen=True)
class Aggregate:
    """One aggregate of the SELECT list: ``function`` of ``column`` (None: ``COUNT(*)``)."""

    function: str
    column: str | None


@dataclass(frozen=True)
class Output:
    """One result column: a table column (``column``) or an aggregate."""

    name: str
    column: str | None = None
    aggregate: Aggregate | None = None


@dataclass(frozen=True)
class QueryPlan:
    """What a query needs from each unit and how to combine what it finds there."""

    sql: str
    table: str
    columns: tuple[str, ...]
    filter: pc.Expression | None
    outputs: tuple[Output, ...]
    group_by: tuple[str, ...]
    order_by: tuple[tuple[str, bool], ...]
    limit: int | None
    key_bounds: tuple[tuple[Key, Key], ...] | None = None
    cone: Cone | None = None
    point_lookup: bool = False
    output_types: dict[str, pa.DataType] = field(default_factory=dict)
    row_mask: Callable[[pa.Table], Any] | None = None
    condition: Condition | None = None

    @property
    def aggregated(self) -> bool:
        return bool(self.group_by) or any(o.aggregate for o in self.outputs)

    def accumulator(self, max_rows: int) -> QueryAccumulator:
        return QueryAccumulator(self, max_rows)


# -- parsing -------------------------------------------------------------------------


def _refuse_everywhere(tree: exp.Expression) -> None:
    """Constructs refused wherever they appear, with a message naming them."""
    for node in tree.walk():
        if isinstance(node, exp.Window):
            raise SqlError("window functions (OVER ...) are not supported")
        if isinstance(node, exp.Subquery | exp.Exists) or (
            isinstance(node, exp.Select) and node is not tree
        ):
            raise SqlError("subqueries are not supported")
        if isinstance(node, exp.Join):
            raise SqlError("joins are not supported: query one table")


def parse_sql(sql: str) -> tuple[str, exp.Select]:
    """The table a query names and its parsed SELECT; ``SqlError`` for anything that is
    not a single SELECT of the supported shape (columns are checked by ``plan_query``)."""
    if not sql.strip():
        raise SqlError("the query is empty", "syntax")
    try:
        statements = [s for s in sqlglot.parse(sql) if s is not None]
    except (SqlglotError, RecursionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise SqlError(f"cannot parse the query: {first}", "syntax") from None
    if len(statements) != 1:
        raise SqlError("send exactly one statement", "syntax")
    tree = statements[0]
    if isinstance(tree, exp.SetOperation):
        raise SqlError(f"{tree.key.upper()} is not supported: query one table")
    if not isinstance(tree, exp.Select):
        raise SqlError(f"only SELECT queries are supported, not {tree.key.upper()}")
    for clause, name in (
        ("with_", "WITH"),
        ("having", "HAVING"),
        ("distinct", "SELECT DISTINCT (use GROUP BY)"),
        ("offset", "OFFSET"),
        ("qualify", "QUALIFY"),
    ):
        if tree.args.get(clause) or (clause == "with_" and tree.args.get("with")):
            raise SqlError(f"{name} is not supported")
    _refuse_everywhere(tree)
    source = tree.args.get("from_") or tree.args.get("from")
    if source is None:
        raise SqlError("FROM is missing: name one table", "syntax")
    table = source.this
    if not isinstance(table, exp.Table) or not isinstance(table.this, exp.Identifier):
        raise SqlError("FROM must name one table")
    name = ".".join(part.name for part in table.parts)
    return name, tree


def plan_query(sql: str, table: ScanTable, *, max_result_rows: int) -> QueryPlan:
    """Compile ``sql`` against a resolved table; ``SqlError`` naming what is wrong."""
    name, tree = parse_sql(sql)
    return _Compiler(table, max_result_rows).compile(sql, name, tree)


def compile_query(
    catalog: Catalog, sql: str, *, max_result_rows: int
) -> tuple[ScanTable, QueryPlan]:
    """Parse ``sql``, resolve its table through the catalog and compile it: the one
    entry point for callers. Every problem is a ``SqlError`` (an unknown table has
    code ``unknown_table``); a failing catalog raises its own ``CatalogError``."""
    name, tree = parse_sql(sql)
    try:
        table = resolve_table(catalog, name)
    except NotFoundError as exc:
        raise SqlError(str(exc), "unknown_table") from None
    except ValueError as exc:
        raise SqlError(str(exc), "unknown_table") from None
    return table, _Compiler(table, max_result_rows).compile(sql, name, tree)


# -- compiling -----------------------------------------------------------------------


def _category(dtype: pa.DataType) -> str:
    if pa.types.is_integer(dtype):
        return "integer"
    if pa.types.is_floating(dtype):
        return "float"
    if pa.types.is_boolean(dtype):
        return "boolean"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return "string"
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype):
        return "binary"
    return "nested"


def _literal(node: exp.Expression) -> Literal:
    if isinstance(node, exp.Paren):
        return _literal(node.this)
    if isinstance(node, exp.Boolean):
        return bool(node.this)
    if isinstance(node, exp.Neg):
        value = _literal(node.this)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SqlError(f"cannot negate {node.this.sql()}", "type_error")
        return -value
    if isinstance(node, exp.Literal):
        if node.is_string:
            return str(node.this)
        text = str(node.this)
        try:
            return int(text)
        except ValueError:
            return float(text)
    if isinstance(node, exp.Null):
        raise SqlError("NULL is not supported as a value; use IS NULL", "type_error")
    raise SqlError(f"expected a literal value, got {node.sql()}")


def _number(node: exp.Expression, what: str) -> float:
    value = _literal(node)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SqlError(f"{what} must be a number, got {node.sql()}", "type_error")
    return float(value)


_TO_FLOAT64 = pc.CastOptions.safe(pa.float64())


@dataclass(frozen=True, eq=False)
class Condition:
    """A WHERE condition, a tree of compute functions over columns and values, in three
    equal forms: a ``pyarrow.compute`` expression (the plan as Arrow states it); a
    function computing the row mask of a table with compute kernels (no per-batch
    overhead of an expression scan); and the tree itself, which ``UnitColumns``
    evaluates with numpy over columns converted once for every query on a unit.

    ``key`` names the condition by its structure, so two queries that share a
    sub-condition (the same comparison, the same cone) compute it once per unit.
    """

    expression: pc.Expression
    mask: Callable[[pa.Table], Any]
    key: Hashable
    function: str = ""
    arguments: tuple[Condition, ...] = ()
    column_name: str | None = None
    scalar: pa.Scalar | None = None
    value_set: pa.Array | None = None
    options_key: Hashable = None

    @classmethod
    def column(cls, name: str) -> Condition:
        return cls(
            pc.field(name), lambda table: table.column(name), ("column", name), column_name=name
        )

    @classmethod
    def value(cls, scalar: pa.Scalar) -> Condition:
        return cls(
            pc.scalar(scalar),
            lambda _table: scalar,
            ("value", str(scalar.type), scalar.as_py()),
            scalar=scalar,
        )

    @classmethod
    def call(
        cls,
        function: str,
        *arguments: Condition,
        options: pc.FunctionOptions | None = None,
        options_key: Hashable = None,
        value_set: pa.Array | None = None,
    ) -> Condition:
        """``function`` of ``arguments``; ``options_key`` names ``options`` in ``key``
        (``value_set``: the values of an ``is_in``)."""
        expression = pc.Expression._call(function, [a.expression for a in arguments], options)

        def mask(table: pa.Table) -> Any:
            return pc.call_function(function, [a.mask(table) for a in arguments], options)

        key = ("call", function, options_key, *(a.key for a in arguments))
        return cls(
            expression,
            mask,
            key,
            function=function,
            arguments=arguments,
            value_set=value_set,
            options_key=options_key,
        )

    def columns(self) -> set[str]:
        """The table columns the condition reads."""
        if self.column_name is not None:
            return {self.column_name}
        return set().union(*(a.columns() for a in self.arguments))


@dataclass
class _KeyConstraints:
    """What the top-level AND of a WHERE says about key columns."""

    equal: dict[str, set[int]] = field(default_factory=dict)
    low: dict[str, int] = field(default_factory=dict)
    high: dict[str, int] = field(default_factory=dict)

    def add_equal(self, column: str, values: set[int]) -> None:
        self.equal[column] = self.equal[column] & values if column in self.equal else values

    def add_low(self, column: str, value: int) -> None:
        self.low[column] = max(self.low.get(column, value), value)

    def add_high(self, column: str, value: int) -> None:
        self.high[column] = min(self.high.get(column, value), value)

    def bounds(self, key: Sequence[str]) -> tuple[tuple[tuple[Key, Key], ...] | None, bool]:
        """Key ranges on the leading key columns, and whether they are exact keys."""
        prefixes: list[Key] = [()]
        for position, column in enumerate(key):
            if column in self.equal:
                values = sorted(self.equal[column])
                if len(prefixes) * len(values) > MAX_KEY_BOUNDS:
                    break
                prefixes = [(*p, v) for p in prefixes for v in values]
                if position == len(key) - 1:
                    return tuple((p, p) for p in prefixes), True
                continue
            if column in self.low or column in self.high:
                low = self.low.get(column, 0)
                high = self.high.get(column, 2**64 - 1)
                return tuple(((*p, low), (*p, high)) for p in prefixes), False
            break
        if prefixes == [()]:
            return None, False
        return tuple((p, p) for p in prefixes), False


class _Compiler:
    def __init__(self, table: ScanTable, max_result_rows: int) -> None:
        self.table = table
        self.max_result_rows = max_result_rows
        self.types = {f.name: f.type for f in table.schema}
        self.used: list[str] = []
        self.cones: list[Cone] = []

    # -- columns and values
    def column(self, node: exp.Expression) -> str:
        if not isinstance(node, exp.Column) or node.table:
            raise SqlError(f"expected a column name, got {node.sql()}")
        name = node.name
        if name not in self.types:
            folded = {n.lower(): n for n in self.types}
            if name.lower() not in folded:
                known = ", ".join(self.types)
                raise SqlError(
                    f"no column {name!r} in table {self.table.name!r} (columns: {known})",
                    "unknown_column",
                )
            name = folded[name.lower()]
        if name not in self.used:
            self.used.append(name)
        return name

    def comparable(self, column: str) -> str:
        category = _category(self.types[column])
        if category in ("binary", "nested"):
            raise SqlError(
                f"column {column!r} ({self.types[column]}) cannot be compared", "type_error"
            )
        return category

    def bind(self, column: str, value: Literal) -> pa.Scalar:
        """``value`` as a scalar comparable with ``column``, or a type error."""
        category = self.comparable(column)
        dtype = self.types[column]
        mismatch = SqlError(
            f"column {column!r} is {dtype}; {value!r} is not a value of that type", "type_error"
        )
        if category in ("integer", "float"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise mismatch
            if isinstance(value, int) and category == "integer":
                try:
                    return pa.scalar(value, dtype)
                except (pa.ArrowInvalid, OverflowError):
                    raise SqlError(
                        f"{value} is outside the range of column {column!r} ({dtype})",
                        "type_error",
                    ) from None
            return pa.scalar(float(value), pa.float64())
        if category == "boolean":
            if not isinstance(value, bool):
                raise mismatch
            return pa.scalar(value)
        if not isinstance(value, str):
            raise mismatch
        return pa.scalar(value, dtype)

    # -- WHERE
    def predicate(self, node: exp.Expression) -> Condition:
        if isinstance(node, exp.Paren):
            return self.predicate(node.this)
        if isinstance(node, exp.And):
            return Condition.call(
                "and_kleene", self.predicate(node.this), self.predicate(node.expression)
            )
        if isinstance(node, exp.Or):
            return Condition.call(
                "or_kleene", self.predicate(node.this), self.predicate(node.expression)
            )
        if isinstance(node, exp.Not):
            return Condition.call("invert", self.predicate(node.this))
        if isinstance(node, exp.EQ) and self._is_cone(node.this):
            return self._cone_equals(node.this, node.expression)
        if isinstance(node, exp.EQ) and self._is_cone(node.expression):
            return self._cone_equals(node.expression, node.this)
        if type(node) in _COMPARISONS:
            return self._comparison(node)
        if isinstance(node, exp.In):
            if node.args.get("query") or node.args.get("unnest") or node.args.get("field"):
                raise SqlError("IN takes a list of values, not a subquery")
            column = self.column(node.this)
            values = [self.bind(column, _literal(v)) for v in node.expressions]
            if not values:
                raise SqlError(f"IN needs at least one value for {column!r}", "syntax")
            value_set = pa.array([v.as_py() for v in values], type=values[0].type)
            return Condition.call(
                "is_in",
                Condition.column(column),
                options=pc.SetLookupOptions(value_set),
                options_key=(str(value_set.type), *value_set.to_pylist()),
                value_set=value_set,
            )
        if isinstance(node, exp.Between):
            column = self.column(node.this)
            low = self.bind(column, _literal(node.args["low"]))
            high = self.bind(column, _literal(node.args["high"]))
            return Condition.call(
                "and_kleene",
                Condition.call("greater_equal", Condition.column(column), Condition.value(low)),
                Condition.call("less_equal", Condition.column(column), Condition.value(high)),
            )
        if isinstance(node, exp.Column):
            column = self.column(node)
            if _category(self.types[column]) != "boolean":
                raise SqlError(
                    f"column {column!r} ({self.types[column]}) is not a condition: compare it",
                    "type_error",
                )
            return Condition.column(column)
        if isinstance(node, exp.Is):
            if not isinstance(node.expression, exp.Null):
                raise SqlError("IS supports only IS NULL and IS NOT NULL")
            return Condition.call("is_null", Condition.column(self.column(node.this)))
        if self._is_cone(node):
            if self._function_name(node) != "cone":
                raise SqlError("scisql_s2PtInCircle(...) must be compared: = 1 or = 0")
            return self._cone(node)
        if isinstance(node, exp.Anonymous | exp.Func) and not isinstance(node, exp.Column):
            raise SqlError(f"function {self._function_name(node)}() is not supported in WHERE")
        raise SqlError(f"{node.sql()!r} is not a supported condition")

    @staticmethod
    def _function_name(node: exp.Expression) -> str:
        if isinstance(node, exp.Anonymous):
            return str(node.this).lower()
        return node.key.lower()

    def _is_cone(self, node: exp.Expression) -> bool:
        return isinstance(node, exp.Anonymous) and self._function_name(node) in CONE_FUNCTIONS

    def _comparison(self, node: exp.Expression) -> Condition:
        function = _COMPARISONS[type(node)]
        left, right = node.this, node.expression
        if isinstance(left, exp.Column) and isinstance(right, exp.Column):
            first, second = self.column(left), self.column(right)
            kinds = {self.comparable(first), self.comparable(second)}
            if not (kinds <= {"integer", "float"} or len(kinds) == 1):
                raise SqlError(
                    f"cannot compare {first!r} ({self.types[first]}) with "
                    f"{second!r} ({self.types[second]})",
                    "type_error",
                )
            return Condition.call(function, Condition.column(first), Condition.column(second))
        for side in (left, right):
            if isinstance(side, exp.Func) and not isinstance(side, exp.Column):
                name = self._function_name(side)  # type: ignore[arg-type]
                raise SqlError(f"function {name}() is not supported in WHERE")
        if not isinstance(left, exp.Column):
            if not isinstance(right, exp.Column):
                raise SqlError(f"{node.sql()!r}: a comparison needs a column on one side")
            left, right, function = right, left, _FLIPPED[function]
        column = self.column(left)
        value = self.bind(column, _literal(right))
        return Condition.call(function, Condition.column(column), Condition.value(value))

    def _cone_equals(self, call: exp.Expression, other: exp.Expression) -> Condition:
        value = _literal(other)
        if value not in (0, 1) or isinstance(value, str):
            raise SqlError(f"{call.sql()} can only be compared with 1 (inside) or 0 (outside)")
        inside = self._cone(call)
        return inside if value == 1 else Condition.call("invert", inside)

    def _cone(self, node: exp.Expression) -> Condition:
        args = list(node.expressions)
        if len(args) != 5:
            raise SqlError(
                f"{node.sql()}: a cone takes (ra_column, dec_column, ra, dec, radius_degrees)",
                "syntax",
            )
        ra_column, dec_column = self.column(args[0]), self.column(args[1])
        for column in (ra_column, dec_column):
            if self.comparable(column) not in ("integer", "float"):
                raise SqlError(f"cone: column {column!r} is not numeric", "type_error")
        ra0 = _number(args[2], "cone centre ra") % 360.0
        dec0 = _number(args[3], "cone centre dec")
        radius = _number(args[4], "cone radius")
        if not -90.0 <= dec0 <= 90.0:
            raise SqlError(f"cone centre dec {dec0} is outside [-90, 90]", "type_error")
        if not 0.0 < radius <= 180.0:
            raise SqlError(f"cone radius {radius} is outside (0, 180] degrees", "type_error")
        self.cones.append(Cone(ra_column, dec_column, ra0, dec0, radius))
        ra = Condition.call(
            "cast", Condition.column(ra_column), options=_TO_FLOAT64, options_key="float64"
        )
        dec = Condition.call(
            "cast", Condition.column(dec_column), options=_TO_FLOAT64, options_key="float64"
        )

        def number(x: float) -> Condition:
            return Condition.value(pa.scalar(x, pa.float64()))

        def times(a: Condition, b: Condition) -> Condition:
            return Condition.call("multiply", a, b)

        def half_sine(column: Condition, centre: float) -> Condition:
            offset = Condition.call("subtract", column, number(centre))
            return Condition.call("sin", times(offset, number(_DEG / 2.0)))

        half_dec, half_ra = half_sine(dec, dec0), half_sine(ra, ra0)
        cos_dec = Condition.call("cos", times(dec, number(_DEG)))
        haversine = Condition.call(
            "add",
            times(half_dec, half_dec),
            times(times(cos_dec, number(math.cos(dec0 * _DEG))), times(half_ra, half_ra)),
        )
        limit = math.sin(radius * _DEG / 2.0) ** 2
        # The declination band is cheap and rules out most rows before the trigonometry.
        band = Condition.call(
            "and_kleene",
            Condition.call("greater_equal", dec, number(dec0 - radius)),
            Condition.call("less_equal", dec, number(dec0 + radius)),
        )
        return Condition.call(
            "and_kleene", band, Condition.call("less_equal", haversine, number(limit))
        )

    def key_constraints(self, node: exp.Expression | None) -> _KeyConstraints:
        found = _KeyConstraints()
        key = set(self.table.key)
        conjuncts: list[exp.Expression] = []
        pending = [node] if node is not None else []
        while pending:
            item = pending.pop()
            if isinstance(item, exp.And):
                pending.extend([item.this, item.expression])
            elif isinstance(item, exp.Paren):
                pending.append(item.this)
            else:
                conjuncts.append(item)
        for item in conjuncts:
            self._constrain(found, key, item)
        return found

    @staticmethod
    def _constrain(found: _KeyConstraints, key: set[str], item: exp.Expression) -> None:
        def key_column(side: exp.Expression) -> str | None:
            return side.name if isinstance(side, exp.Column) and side.name in key else None

        def integer(side: exp.Expression) -> int | None:
            try:
                value = _literal(side)
            except SqlError:
                return None
            if isinstance(value, bool) or not isinstance(value, int):
                return None
            return value

        if isinstance(item, exp.In):
            column = key_column(item.this)
            values = [integer(v) for v in item.expressions]
            if column and values and all(v is not None for v in values):
                found.add_equal(column, {v for v in values if v is not None})
        elif isinstance(item, exp.Between):
            column = key_column(item.this)
            low, high = integer(item.args["low"]), integer(item.args["high"])
            if column and low is not None and high is not None:
                found.add_low(column, low)
                found.add_high(column, high)
        elif type(item) in _COMPARISONS and not isinstance(item, exp.NEQ):
            function = _COMPARISONS[type(item)]
            column, value = key_column(item.this), integer(item.expression)
            if column is None:
                column, value = key_column(item.expression), integer(item.this)
                function = _FLIPPED[function]
            if column is None or value is None:
                return
            if function == "equal":
                found.add_equal(column, {value})
            elif function in ("greater", "greater_equal"):
                found.add_low(column, value + (function == "greater"))
            else:
                found.add_high(column, value - (function == "less"))

    # -- SELECT
    def output(self, node: exp.Expression) -> Output:
        alias: str | None = None
        if isinstance(node, exp.Alias):
            alias, node = node.alias, node.this
        if isinstance(node, exp.Column):
            column = self.column(node)
            return Output(alias or column, column=column)
        for kind in AGGREGATES:
            if isinstance(node, kind):
                return Output(alias or self._aggregate_name(node), aggregate=self.aggregate(node))
        if isinstance(node, exp.Anonymous | exp.Func):
            raise SqlError(
                f"function {self._function_name(node)}() is not supported in SELECT "
                "(supported: COUNT, SUM, AVG, MIN, MAX)"
            )
        raise SqlError(
            f"{node.sql()!r}: SELECT takes columns and COUNT/SUM/AVG/MIN/MAX of a column"
        )

    @staticmethod
    def _aggregate_name(node: exp.Expression) -> str:
        return node.sql().lower().replace(" ", "")

    def aggregate(self, node: exp.Expression) -> Aggregate:
        function = AGGREGATES[type(node)]
        argument = node.this
        if isinstance(argument, exp.Distinct):
            raise SqlError(f"{function.upper()}(DISTINCT ...) is not supported")
        if isinstance(argument, exp.Star):
            if function != "count":
                raise SqlError(f"{function.upper()}(*) is not valid; name a column", "syntax")
            return Aggregate("count", None)
        if node.expressions:
            raise SqlError(f"{function.upper()} takes one column", "syntax")
        column = self.column(argument)
        category = _category(self.types[column])
        numeric = category in ("integer", "float")
        if (function in ("sum", "avg") and not numeric) or (
            function in ("min", "max") and not (numeric or category == "string")
        ):
            raise SqlError(
                f"{function.upper()}({column}): column {column!r} is {self.types[column]}",
                "type_error",
            )
        return Aggregate(function, column)

    def compile(self, sql: str, name: str, tree: exp.Select) -> QueryPlan:
        outputs: list[Output] = []
        for node in tree.expressions:
            if isinstance(node, exp.Star):
                outputs.extend(Output(c, column=c) for c in self.types)
                self.used.extend(c for c in self.types if c not in self.used)
            else:
                outputs.append(self.output(node))
        names = [o.name for o in outputs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SqlError(f"output column {duplicates[0]!r} appears twice: give it an alias")
        group = tree.args.get("group")
        group_by: list[str] = []
        if group is not None:
            for node in group.expressions:
                column = self.column(node)
                if self.comparable(column) and column not in group_by:
                    group_by.append(column)
        aggregated = bool(group_by) or any(o.aggregate for o in outputs)
        if aggregated:
            for out in outputs:
                if out.column is not None and out.column not in group_by:
                    raise SqlError(
                        f"column {out.column!r} must be in GROUP BY or inside an aggregate"
                    )
        where = tree.args.get("where")
        condition = self.predicate(where.this) if where is not None else None
        order_by = self._order_by(tree, outputs)
        limit = self._limit(tree)
        constraints = self.key_constraints(where.this if where is not None else None)
        bounds, exact = constraints.bounds(self.table.key)
        # A cone restricts the units only when it is a condition of the top-level AND.
        top_cones = self._top_level_cones(where.this if where is not None else None)
        return QueryPlan(
            sql=sql,
            table=name,
            columns=tuple(self.used),
            filter=None if condition is None else condition.expression,
            row_mask=None if condition is None else condition.mask,
            condition=condition,
            outputs=tuple(outputs),
            group_by=tuple(group_by),
            order_by=order_by,
            limit=limit,
            key_bounds=bounds,
            cone=top_cones[0] if top_cones else None,
            point_lookup=exact,
            output_types={o.name: self.types[o.column] for o in outputs if o.column},
        )

    def _top_level_cones(self, node: exp.Expression | None) -> list[Cone]:
        if node is None:
            return []
        if isinstance(node, exp.Paren):
            return self._top_level_cones(node.this)
        if isinstance(node, exp.And):
            return self._top_level_cones(node.this) + self._top_level_cones(node.expression)
        probe = _Compiler(self.table, self.max_result_rows)
        if self._is_cone(node) and self._function_name(node) == "cone":
            probe._cone(node)
            return probe.cones
        if isinstance(node, exp.EQ):
            for call, other in ((node.this, node.expression), (node.expression, node.this)):
                if self._is_cone(call) and _literal(other) == 1:
                    probe._cone(call)
                    return probe.cones
        return []

    def _order_by(self, tree: exp.Select, outputs: list[Output]) -> tuple[tuple[str, bool], ...]:
        order = tree.args.get("order")
        if order is None:
            return ()
        by_name = {o.name: o for o in outputs}
        by_text = {
            self._aggregate_name(n.this if isinstance(n, exp.Alias) else n): o.name
            for n, o in zip(tree.expressions, outputs, strict=False)
            if not isinstance(n, exp.Star)
        }
        keys: list[tuple[str, bool]] = []
        for item in order.expressions:
            target = item.this
            name: str | None = None
            if isinstance(target, exp.Column) and target.name in by_name:
                name = target.name
            elif self._aggregate_name(target) in by_text:
                name = by_text[self._aggregate_name(target)]
            if name is None:
                raise SqlError(f"ORDER BY {target.sql()}: order by a column of the SELECT list")
            out = by_name[name]
            if out.column is not None and _category(self.types[out.column]) == "nested":
                raise SqlError(f"ORDER BY {name}: nested columns cannot be ordered", "type_error")
            keys.append((name, bool(item.args.get("desc"))))
        return tuple(keys)

    def _limit(self, tree: exp.Select) -> int | None:
        limit = tree.args.get("limit")
        if limit is None:
            return None
        value = _literal(limit.expression)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SqlError(f"LIMIT must be a whole number >= 0, got {limit.expression.sql()}")
        if value > self.max_result_rows:
            raise SqlError(
                f"LIMIT {value} is above the largest result allowed ({self.max_result_rows} rows)",
                "too_many_rows",
            )
        return value


# -- evaluating ----------------------------------------------------------------------

_PARTIALS = {
    "count": ("count", "sum"),
    "sum": ("sum", "sum"),
    "min": ("min", "min"),
    "max": ("max", "max"),
}
_NUMPY_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "equal": np.equal,
    "not_equal": np.not_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "and_kleene": np.logical_and,
    "or_kleene": np.logical_or,
    "invert": np.logical_not,
    "add": np.add,
    "subtract": np.subtract,
    "multiply": np.multiply,
    "sin": np.sin,
    "cos": np.cos,
}
# Below this many distinct values a column's group codes are its values less the
# smallest (no hashing); above, Arrow's dictionary encoding numbers them.
_DENSE_GROUPS = 1 << 16
# IN lists up to this long are evaluated as ORed equalities.
_SMALL_IN_LIST = 16
# Rows per block of a unit: every query reads a block while it is in the processor's cache.
BLOCK_ROWS = 1 << 18
# Queries with at most this many groups in a unit keep per-group sums block by block.
_BLOCKED_GROUPS = 4096
# Keys in runs averaging at least this many rows are aggregated run by run.
_RUN_ROWS = 16
# A mask selecting at most one row in this many is applied by indexing (cheap when
# sparse); denser ones by arithmetic over every row.
_SPARSE = 16
# Integer sums through float64 bins are exact while every partial sum stays below 2^53.
_EXACT_FLOAT_INTEGERS = 2**53


def _partial_specs(plan: QueryPlan) -> list[tuple[str | None, str]]:
    """The distinct (column, partial function) pairs the aggregates need."""
    specs: list[tuple[str | None, str]] = []
    for out in plan.outputs:
        if out.aggregate is None:
            continue
        functions = (
            ["sum", "count"] if out.aggregate.function == "avg" else [out.aggregate.function]
        )
        for function in functions:
            spec = (out.aggregate.column, function)
            if spec not in specs:
                specs.append(spec)
    return specs


def _partial_name(column: str | None, function: str) -> str:
    return "count_all" if column is None else f"{column}_{function}"


@dataclass(frozen=True)
class _Groups:
    """Group numbers of one unit (or block) for a list of columns: each row's group
    (None: one group, every key constant in the unit), how many groups there are,
    and how to turn group numbers back into key values.

    Keys often come in long runs (map-files are sorted by run and event, so a run
    number or a luminosity block changes rarely): then ``starts`` are the first row
    of each run and ``run_codes`` its group, and aggregates are taken per run.
    """

    codes: NDArray[Any] | None
    size: int
    uniques: tuple[pa.Array, ...]
    radix: tuple[int, ...]
    # When the combined numbers were compacted (too sparse): group number -> combined.
    combined: NDArray[np.int64] | None = None
    starts: NDArray[np.intp] | None = None
    run_codes: NDArray[Any] | None = None

    def with_runs(self) -> _Groups:
        """The same groups, with runs when there are few (at most one per ``_RUN_ROWS``)."""
        if self.codes is None or len(self.codes) < 2:
            return self
        changes = np.flatnonzero(self.codes[1:] != self.codes[:-1])
        if len(changes) + 1 > len(self.codes) // _RUN_ROWS:
            return self
        starts = np.concatenate(([0], changes + 1)).astype(np.intp)
        return replace(self, starts=starts, run_codes=self.codes[starts])

    def slice(self, start: int, rows: int) -> _Groups:
        if self.codes is None:
            return self
        codes = self.codes[start : start + rows]
        if self.starts is None:
            return replace(self, codes=codes)
        first = int(np.searchsorted(self.starts, start, side="right"))
        last = int(np.searchsorted(self.starts, start + rows, side="left"))
        starts = np.concatenate(([0], self.starts[first:last] - start)).astype(np.intp)
        return replace(self, codes=codes, starts=starts, run_codes=codes[starts])

    def keys(self, groups: NDArray[np.intp]) -> list[pa.Array]:
        """The key columns of the given group numbers."""
        ids = groups.astype(np.int64) if self.combined is None else self.combined[groups]
        positions: list[NDArray[np.int64]] = []
        for size in reversed(self.radix):
            positions.append(ids % size)
            ids = ids // size
        positions.reverse()
        return [u.take(pa.array(p)) for u, p in zip(self.uniques, positions, strict=True)]


def _narrow(codes: NDArray[Any], size: int) -> NDArray[Any]:
    """Group numbers in the narrowest unsigned type that holds ``size`` of them (less
    memory to stream through for every query)."""
    for kind, limit in ((np.uint8, 1 << 8), (np.uint16, 1 << 16), (np.uint32, 1 << 32)):
        if size <= limit:
            return codes.astype(kind, copy=False)
    return codes.astype(np.int64, copy=False)


class UnitColumns:
    """One decoded unit, shared by every query that reads it.

    Each column is converted to numpy once and each list of group-by columns
    numbered once for the whole unit; the queries then run block by block
    (``blocks()``: views of ``BLOCK_ROWS`` rows that stay in the processor's
    cache while every query reads them), and each condition's row mask is
    computed once per block, by its structural key, for every query that has it.
    Only null-free columns are converted: a query over a column with nulls (or a
    condition numpy cannot state) is evaluated by Arrow's kernels instead, which
    give the same answer.
    """

    def __init__(self, table: pa.Table, *, parent: UnitColumns | None = None, start: int = 0):
        self.table = table
        self.rows = table.num_rows
        self.start = start
        self._parent = parent
        self._arrays: dict[str, NDArray[Any] | None] = {}
        self._ranges: dict[str, tuple[Any, Any]] = {}
        self._vectors: dict[Hashable, Any] = {}
        self._groups: dict[tuple[str, ...], _Groups | None] = {}
        self._null_free: dict[str, bool] = {}

    def blocks(self, rows: int = 0) -> Iterator[UnitColumns]:
        """The unit as consecutive views of ``rows`` rows (``BLOCK_ROWS`` by default)."""
        size = rows or BLOCK_ROWS
        if self.rows <= size:
            yield self
            return
        for start in range(0, self.rows, size):
            yield UnitColumns(self.table.slice(start, size), parent=self, start=start)

    def null_free(self, columns: Sequence[str]) -> bool:
        if self._parent is not None:
            return self._parent.null_free(columns)
        for name in columns:
            if name not in self._null_free:
                self._null_free[name] = self.table.column(name).null_count == 0
            if not self._null_free[name]:
                return False
        return True

    def array(self, name: str) -> NDArray[Any] | None:
        """A null-free numeric or boolean column as numpy (None for other columns)."""
        if name not in self._arrays:
            if self._parent is not None:
                whole = self._parent.array(name)
                view = None if whole is None else whole[self.start : self.start + self.rows]
                self._arrays[name] = view
            else:
                column = self.table.column(name)
                kind = column.type
                usable = (
                    pa.types.is_integer(kind)
                    or pa.types.is_floating(kind)
                    or pa.types.is_boolean(kind)
                )
                self._arrays[name] = (
                    np.asarray(column.to_numpy()) if usable and column.null_count == 0 else None
                )
        return self._arrays[name]

    def range(self, name: str) -> tuple[Any, Any]:
        """(smallest, largest) of a numeric column in the whole unit (NaN if it has NaN)."""
        if self._parent is not None:
            return self._parent.range(name)
        if name not in self._ranges:
            array = self.array(name)
            assert array is not None and len(array)
            self._ranges[name] = (array.min().item(), array.max().item())
        return self._ranges[name]

    def mask(self, condition: Condition) -> NDArray[np.bool_] | None:
        """The rows where ``condition`` holds; None when numpy cannot state it."""
        value = self._vector(condition)
        if value is None:
            return None
        if np.ndim(value) == 0:
            return np.full(self.rows, bool(value))
        return np.asarray(value, dtype=np.bool_)

    def _vector(self, condition: Condition) -> Any:
        key = condition.key
        if key not in self._vectors:
            self._vectors[key] = self._compute(condition)
        return self._vectors[key]

    def _compute(self, condition: Condition) -> Any:
        if condition.column_name is not None:
            return self.array(condition.column_name)
        if condition.scalar is not None:
            kind = condition.scalar.type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
                return None
            # A typed numpy scalar: numpy compares in the column's type, or float64 for a
            # float value, as Arrow does (a Python float would compare in float32).
            return np.array(condition.scalar.as_py(), dtype=kind.to_pandas_dtype())[()]
        function = condition.function
        arguments = [self._vector(a) for a in condition.arguments]
        if any(a is None for a in arguments):
            return self._by_arrow(condition)
        if function == "cast" and condition.options_key == "float64":
            return np.asarray(arguments[0], dtype=np.float64)
        if function == "is_in":
            return self._is_in(condition, arguments[0])
        if function == "is_null":
            return np.zeros(self.rows, dtype=np.bool_)  # converted columns are null-free
        if function not in _NUMPY_FUNCTIONS:
            return self._by_arrow(condition)
        if len(arguments) == 2 and all(np.ndim(a) for a in arguments):
            left, right = (np.asarray(a).dtype for a in arguments)
            if left.kind in "iu" and right.kind in "iu" and np.result_type(left, right).kind == "f":
                return self._by_arrow(condition)  # int64 against uint64: Arrow's rules
        return _NUMPY_FUNCTIONS[function](*arguments)

    def _is_in(self, condition: Condition, values: NDArray[Any]) -> Any:
        column = condition.arguments[0].column_name
        value_set = condition.value_set
        if (
            column is None
            or value_set is None
            or value_set.type != self.table.schema.field(column).type
        ):
            return self._by_arrow(condition)
        wanted = value_set.to_numpy()
        if len(wanted) <= _SMALL_IN_LIST:
            # A few equalities beat np.isin's sort or lookup table on millions of rows.
            found = values == wanted[0]
            for value in wanted[1:]:
                found |= values == value
            return found
        return np.isin(values, wanted)

    def _by_arrow(self, condition: Condition) -> NDArray[np.bool_] | None:
        result = condition.mask(self.table)
        if isinstance(result, pa.Scalar) or result.null_count:
            return None
        return np.asarray(result.to_numpy(zero_copy_only=False))

    def groups(self, columns: tuple[str, ...]) -> _Groups | None:
        """Group numbers for ``columns`` (None when one of them holds nulls)."""
        if columns not in self._groups:
            if self._parent is not None:
                whole = self._parent.groups(columns)
                found = None if whole is None else whole.slice(self.start, self.rows)
            else:
                found = self._group_codes(columns) if self.rows else None
            self._groups[columns] = found
        return self._groups[columns]

    def _column_codes(self, name: str) -> tuple[NDArray[Any] | None, pa.Array]:
        """Each row's number among the column's distinct values (None: all the same
        value), and the values."""
        array = self.array(name)
        kind = self.table.schema.field(name).type
        if array is not None and array.dtype.kind in "iub":
            low, high = self.range(name)
            if low == high:
                return None, pa.array(array[:1], type=kind)
            if array.dtype.kind == "b":
                return array.view(np.uint8), pa.array([False, True])
            if high - low < max(2 * self.rows, _DENSE_GROUPS):
                codes = _narrow(array - array.dtype.type(low), high - low + 1)
                return codes, pa.array(np.arange(low, high + 1, dtype=array.dtype), type=kind)
        encoded = self.table.column(name).combine_chunks().dictionary_encode()
        return encoded.indices.to_numpy(), encoded.dictionary

    def _group_codes(self, columns: tuple[str, ...]) -> _Groups | None:
        if not self.null_free(columns):
            return None
        parts = [self._column_codes(name) for name in columns]
        radix = tuple(max(1, len(uniques)) for _, uniques in parts)
        uniques = tuple(u for _, u in parts)
        numbered = [(codes, width) for (codes, _), width in zip(parts, radix, strict=True)]
        if all(codes is None for codes, _ in numbered):
            return _Groups(None, 1, uniques, radix)
        varying = [(codes, width) for codes, width in numbered if codes is not None]
        if len(varying) == 1:
            # The other keys are constant here (one value each): the group is this one's.
            return _Groups(varying[0][0], varying[0][1], uniques, radix).with_runs()
        combined: NDArray[Any] = np.zeros(self.rows, dtype=np.int64)
        size = 1
        for codes, width in numbered:
            combined = combined * width
            if codes is not None:
                combined += codes
            size *= width
        if size <= max(2 * self.rows, _DENSE_GROUPS):
            return _Groups(_narrow(combined, size), size, uniques, radix).with_runs()
        values, inverse = np.unique(combined, return_inverse=True)
        compact = _Groups(_narrow(inverse, len(values)), len(values), uniques, radix, values)
        return compact.with_runs()


class _NotVectorisedError(Exception):
    """numpy cannot evaluate this query on this unit: Arrow's kernels will."""


def _acc_type(dtype: np.dtype[Any]) -> type[np.generic]:
    """The type numpy sums a column in, as Arrow does: 64-bit of the same kind."""
    return {"u": np.uint64, "i": np.int64}.get(dtype.kind, np.float64)


def _extreme_start(dtype: np.dtype[Any], function: str) -> Any:
    if dtype.kind == "f":
        return np.inf if function == "min" else -np.inf
    limits = np.iinfo(dtype)
    return limits.max if function == "min" else limits.min


def _order_key(array: NDArray[Any]) -> tuple[NDArray[Any], Callable[[NDArray[Any]], Any]]:
    """Unsigned integers in the order of ``array``'s values, and the way back: MIN and MAX
    then take integer passes (rows outside a mask set to 0), exact for any numeric type
    (floats by their bits: negatives' magnitude bits flipped, then the sign bit)."""
    if array.dtype.kind == "u":
        return array, lambda key: key
    width = array.dtype.itemsize * 8
    unsigned, signed = np.dtype(f"u{array.dtype.itemsize}"), np.dtype(f"i{array.dtype.itemsize}")
    sign = unsigned.type(1 << (width - 1))
    if array.dtype.kind == "i":
        return array.view(unsigned) ^ sign, lambda key: (key ^ sign).view(array.dtype)
    low = signed.type((1 << (width - 1)) - 1)
    bits = array.view(signed)
    ordered = bits ^ ((bits >> (width - 1)) & low)

    def back(key: NDArray[Any]) -> Any:
        found = (key ^ sign).view(signed)
        return (found ^ ((found >> (width - 1)) & low)).view(array.dtype)

    return ordered.view(unsigned) ^ sign, back


def _selected_sums(
    array: NDArray[Any], mask: NDArray[np.bool_] | None, finite: bool
) -> NDArray[Any]:
    """``array`` with the rows outside ``mask`` set to 0: a multiplication (one fast pass),
    or, for floats that may hold inf or NaN (0 times inf is NaN), a slower select."""
    if mask is None:
        return array
    if array.dtype.kind in "iu" or finite:
        return array * mask
    return np.where(mask, array, array.dtype.type(0))


def _selected_extremes(
    function: str,
    array: NDArray[Any],
    mask: NDArray[np.bool_] | None,
    starts: NDArray[np.intp] | None = None,
) -> NDArray[Any]:
    """MIN or MAX of ``array`` over the rows of ``mask``, in total (one value) or per run
    beginning at ``starts``; where no row is selected the value is meaningless."""
    key, back = _order_key(array)
    if function == "min":
        key = ~key
    if mask is not None:
        key = key * mask
    found = np.atleast_1d(key.max() if starts is None else np.maximum.reduceat(key, starts))
    return np.asarray(back(~found if function == "min" else found))


class _VectorRun:
    """One query over one unit with numpy, fed block by block: running counts, sums,
    minima and maxima (one value, or one per group of the unit), or the numbers of
    the matching rows; ``partial()`` is then what Arrow's kernels would have given."""

    def __init__(self, accumulator: QueryAccumulator, unit: UnitColumns) -> None:
        plan = accumulator.plan
        if not unit.rows or not unit.null_free(plan.columns):
            raise _NotVectorisedError
        self.accumulator = accumulator
        self.plan = plan
        self.unit = unit
        self.selected = 0
        self.groups: _Groups | None = None
        self.values: list[Any] = []
        self.rows: list[NDArray[np.int64]] = []
        self.kept = 0
        if not plan.aggregated:
            self.blocked = True
            return
        for column, function in accumulator.specs:
            if function == "count":
                continue
            array = None if column is None else unit.array(column)
            if array is None or array.dtype.kind not in "iuf":
                raise _NotVectorisedError  # MIN/MAX of strings: Arrow's kernels
            nan = array.dtype.kind == "f" and math.isnan(unit.range(column or "")[0])
            if function in ("min", "max") and nan:
                raise _NotVectorisedError  # Arrow's MIN/MAX skip NaN, numpy's do not
        if plan.group_by:
            self.groups = unit.groups(plan.group_by)
            if self.groups is None:
                raise _NotVectorisedError
        size = 1 if self.groups is None else self.groups.size
        # Per-group state is updated block by block only while it is small; a unit with
        # very many groups is aggregated in one go.
        self.blocked = size <= _BLOCKED_GROUPS
        self.counts = np.zeros(size, dtype=np.int64)
        for column, function in accumulator.specs:
            if column is None or function == "count":
                self.values.append(None)
                continue
            dtype = unit.array(column).dtype  # type: ignore[union-attr]
            if function == "sum":
                self.values.append(np.zeros(size, dtype=_acc_type(dtype)))
            else:
                self.values.append(np.full(size, _extreme_start(dtype, function), dtype=dtype))

    def update(self, block: UnitColumns) -> None:
        """Fold in one block of the unit (or the whole unit)."""
        mask = None
        if self.plan.condition is not None:
            mask = block.mask(self.plan.condition)
            if mask is None:
                raise _NotVectorisedError
        if not self.plan.aggregated:
            self._update_rows(block, mask)
            return
        if self.groups is None or self.groups.codes is None:
            selected = block.rows if mask is None else int(np.count_nonzero(mask))
            self.counts[0] += selected
            if selected:
                self._update_totals(block, mask)
            return
        groups = block.groups(self.plan.group_by)
        assert groups is not None and groups.codes is not None
        if groups.starts is not None and groups.run_codes is not None:
            self._update_runs(block, mask, groups.starts, groups.run_codes)
            return
        size = len(self.counts)
        selected = block.rows if mask is None else int(np.count_nonzero(mask))
        if mask is None or selected * _SPARSE <= block.rows:
            self._update_groups(block, mask, groups.codes, size)
            return
        # A dense mask: indexing by it is slow (unpredictable branches); rows outside it
        # go to an extra group 0 instead, and the groups are numbered from 1.
        shifted = groups.codes.astype(np.intp)
        shifted += 1
        shifted *= mask
        self.counts += np.bincount(shifted, minlength=size + 1)[1:]
        for (column, function), state in zip(self.accumulator.specs, self.values, strict=True):
            if state is None or column is None:
                continue
            array = block.array(column)
            assert array is not None
            if function == "sum":
                if not self._add_binned(block, column, state, shifted, array, 1):
                    np.add.at(state, groups.codes[mask], array[mask].astype(state.dtype))
            else:
                extended = np.concatenate((state[:1], state))
                (np.minimum if function == "min" else np.maximum).at(extended, shifted, array)
                state[:] = extended[1:]

    def _update_groups(
        self,
        block: UnitColumns,
        mask: NDArray[np.bool_] | None,
        codes: NDArray[Any],
        size: int,
    ) -> None:
        """Per group, over all rows or over the few rows of a sparse mask."""
        chosen = codes if mask is None else codes[mask]
        self.counts += np.bincount(chosen, minlength=size)
        for (column, function), state in zip(self.accumulator.specs, self.values, strict=True):
            if state is None or column is None:
                continue
            array = block.array(column)
            assert array is not None
            values = array if mask is None else array[mask]
            if function == "sum":
                if not self._add_binned(block, column, state, chosen, values, 0):
                    np.add.at(state, chosen, values.astype(state.dtype))
            else:
                (np.minimum if function == "min" else np.maximum).at(state, chosen, values)

    @staticmethod
    def _add_binned(
        block: UnitColumns,
        column: str,
        state: NDArray[Any],
        codes: NDArray[Any],
        values: NDArray[Any],
        skip: int,
    ) -> bool:
        """Add per-group sums through float64 bins (the first ``skip`` bins dropped)
        when that is exact; False when integer sums could exceed 2^53."""
        if values.dtype.kind in "iu":
            low, high = block.range(column)
            if max(abs(low), abs(high)) * len(values) >= _EXACT_FLOAT_INTEGERS:
                return False
        binned = np.bincount(codes, weights=values, minlength=len(state) + skip)[skip:]
        np.add(state, binned.astype(state.dtype, copy=False), out=state)
        return True

    def _update_runs(
        self,
        block: UnitColumns,
        mask: NDArray[np.bool_] | None,
        starts: NDArray[np.intp],
        runs: NDArray[Any],
    ) -> None:
        """Aggregate run by run (a run of rows shares one group), then per group."""
        if mask is None:
            counted = np.diff(np.append(starts, block.rows))
        else:
            counted = np.add.reduceat(mask, starts, dtype=np.int64)
        np.add.at(self.counts, runs, counted)
        kept = counted > 0
        for (column, function), state in zip(self.accumulator.specs, self.values, strict=True):
            if state is None or column is None:
                continue
            array = block.array(column)
            assert array is not None
            if function == "sum":
                selected = _selected_sums(array, mask, self._finite(block, column))
                np.add.at(state, runs, np.add.reduceat(selected, starts, dtype=state.dtype))
            else:
                found = _selected_extremes(function, array, mask, starts)
                extreme = np.minimum if function == "min" else np.maximum
                extreme.at(state, runs[kept], found[kept])

    @staticmethod
    def _finite(block: UnitColumns, column: str) -> bool:
        low, high = block.range(column)
        return math.isfinite(low) and math.isfinite(high)

    def _update_totals(self, block: UnitColumns, mask: NDArray[np.bool_] | None) -> None:
        selected = block.rows if mask is None else int(np.count_nonzero(mask))
        sparse = mask is not None and selected * _SPARSE <= block.rows
        for (column, function), state in zip(self.accumulator.specs, self.values, strict=True):
            if state is None or column is None:
                continue
            array = block.array(column)
            assert array is not None
            if sparse:
                values = array[mask]
                if function == "sum":
                    state[0] += np.add.reduce(values, dtype=state.dtype)
                elif function == "min":
                    state[0] = min(state[0], values.min())
                else:
                    state[0] = max(state[0], values.max())
            elif function == "sum":
                selected_values = _selected_sums(array, mask, self._finite(block, column))
                state[0] += np.add.reduce(selected_values, dtype=state.dtype)
            else:
                found = _selected_extremes(function, array, mask)[0]
                state[0] = min(state[0], found) if function == "min" else max(state[0], found)

    def _update_rows(self, block: UnitColumns, mask: NDArray[np.bool_] | None) -> None:
        plan = self.plan
        wanted: int | None = None
        if plan.limit is not None and not plan.order_by:
            wanted = max(plan.limit - self.accumulator.held - self.kept, 0)
            if wanted == 0:
                return
        if mask is None:
            found = np.arange(block.start, block.start + block.rows, dtype=np.int64)
        else:
            found = np.flatnonzero(mask).astype(np.int64) + block.start
        if wanted is not None:
            found = found[:wanted]
        self.rows.append(found)
        self.kept += len(found)

    def partial(self, schema: pa.Schema | None) -> pa.Table:
        """The unit's partial result: projected rows, or partial aggregates in ``schema``."""
        if not self.plan.aggregated:
            return self._projected()
        assert schema is not None
        if self.groups is None or self.groups.codes is None:
            if self.groups is not None and self.counts[0] == 0:
                return schema.empty_table()
            present = np.zeros(1, dtype=np.intp)
        else:
            present = np.flatnonzero(self.counts)
        keys = [] if self.groups is None else self.groups.keys(present)
        columns: list[pa.Array] = list(keys)
        empty = self.groups is None and self.counts[0] == 0
        for state, field_ in zip(self.values, list(schema)[len(keys) :], strict=True):
            if state is None:
                columns.append(pa.array(self.counts[present], type=field_.type))
            elif empty:
                columns.append(pa.nulls(1, type=field_.type))  # SUM/MIN/MAX of no rows
            else:
                columns.append(pa.array(state[present], type=field_.type))
        return pa.Table.from_arrays(columns, schema=schema)

    def _projected(self) -> pa.Table:
        outputs = [o for o in self.plan.outputs if o.column is not None]
        chosen = np.concatenate(self.rows) if self.rows else np.zeros(0, dtype=np.int64)
        columns: list[Any] = []
        fields = []
        for out in outputs:
            assert out.column is not None
            array = self.unit.array(out.column)
            column_field = self.unit.table.schema.field(out.column)
            fields.append(column_field.with_name(out.name))
            if array is not None:
                columns.append(pa.array(array[chosen], type=column_field.type))
            else:
                columns.append(self.unit.table.column(out.column).take(pa.array(chosen)))
        return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def feed_unit(
    accumulators: Sequence[QueryAccumulator], data: pa.Table | UnitColumns
) -> list[Exception | None]:
    """Evaluate one unit for many queries at once: the numpy queries block by block
    (every query on a block while it is in cache), the others with Arrow's kernels.
    Returns, per accumulator, the error that stopped it (``SqlError`` such as too
    many rows, or an Arrow or type error), else None; the others are not affected."""
    unit = data if isinstance(data, UnitColumns) else UnitColumns(data)
    failures: list[Exception | None] = [None] * len(accumulators)
    runs: dict[int, _VectorRun] = {}
    for number, accumulator in enumerate(accumulators):
        accumulator.units += 1
        accumulator.rows_seen += unit.rows
        if not accumulator.plan.aggregated and accumulator.satisfied:
            continue
        try:
            runs[number] = _VectorRun(accumulator, unit)
        except _NotVectorisedError:
            failures[number] = _guarded(accumulator.add_by_arrow, unit.table)
    blocked = [n for n, run in runs.items() if run.blocked]
    for block in unit.blocks() if blocked else ():
        for number in blocked:
            if number in runs:
                failures[number] = _guarded(runs[number].update, block)
                if failures[number] is not None:
                    del runs[number]
    for number, run in runs.items():
        if not run.blocked:
            failures[number] = _guarded(run.update, unit)
            if failures[number] is not None:
                continue
        failures[number] = _guarded(accumulators[number].absorb_run, run)
    for number, failure in enumerate(failures):
        if isinstance(failure, _NotVectorisedError):
            failures[number] = _guarded(accumulators[number].add_by_arrow, unit.table)
    return failures


def _guarded(action: Callable[[Any], None], argument: Any) -> Exception | None:
    try:
        action(argument)
    except (_NotVectorisedError, SqlError, pa.ArrowException, ValueError, TypeError) as exc:
        return exc
    return None


class QueryAccumulator:
    """Evaluates a plan on units one at a time and merges what each gives.

    ``add(unit)`` filters the unit, projects or aggregates it and folds the
    partial result in (``feed_unit`` does so for many queries on one unit);
    ``result()`` is the final answer (ORDER BY and LIMIT applied). ``satisfied``
    turns true when a LIMIT without ORDER BY is reached, so the query needs no
    more units. More than ``max_rows`` result rows (or groups) raises
    ``ResultTooLargeError``. ``partial()`` and ``absorb()`` carry what one
    accumulator holds into another (units evaluated elsewhere).

    A unit is evaluated with numpy when its columns allow, else with Arrow's
    kernels; both give the same rows and the same aggregate types.
    """

    def __init__(self, plan: QueryPlan, max_rows: int) -> None:
        self.plan = plan
        self.max_rows = max_rows
        self.rows_seen = 0
        self.units = 0
        self.specs = _partial_specs(plan)
        self._pieces: list[pa.Table] = []
        self._held = 0
        self._partial_schema: pa.Schema | None = None

    @property
    def held(self) -> int:
        """Rows (or groups) held so far."""
        return self._held

    @property
    def satisfied(self) -> bool:
        plan = self.plan
        return (
            plan.limit is not None
            and not plan.order_by
            and not plan.aggregated
            and self._held >= plan.limit
        )

    def add(self, data: pa.Table | UnitColumns) -> None:
        """Evaluate the plan on one unit (a table, or a unit shared with other queries)."""
        (failure,) = feed_unit([self], data)
        if failure is not None:
            raise failure

    def absorb(self, piece: pa.Table) -> None:
        """Fold in a partial result: aggregates of some units, or their projected rows."""
        if self.plan.aggregated:
            self._fold_partial(piece)
        else:
            self._fold_rows(piece)

    def partial(self) -> pa.Table | None:
        """What this accumulator holds, for another one to ``absorb`` (None: nothing)."""
        if not self._pieces:
            return None
        if self.plan.aggregated:
            return self._merged()
        combined = pa.concat_tables(self._pieces)
        return self._top(combined) if self.plan.limit is not None else combined

    def add_by_arrow(self, table: pa.Table) -> None:
        """Evaluate the plan on a unit's table with Arrow's kernels."""
        filtered = table.select(list(self.plan.columns))
        if self.plan.row_mask is not None and filtered.num_rows:
            filtered = filtered.filter(self.plan.row_mask(filtered))
        if self.plan.aggregated:
            self.absorb(filtered.group_by(list(self.plan.group_by)).aggregate(self._aggregations()))
        elif not self.satisfied:
            self.absorb(self._project(filtered))

    def absorb_run(self, run: _VectorRun) -> None:
        """Fold in a unit evaluated with numpy."""
        schema = self._schema_of_partials(run.unit.table) if self.plan.aggregated else None
        self.absorb(run.partial(schema))

    def _aggregations(self) -> list[tuple[Any, ...]]:
        return [
            ([], "count_all") if column is None else (column, function)
            for column, function in self.specs
        ]

    def _schema_of_partials(self, table: pa.Table) -> pa.Schema:
        """The partial aggregates' schema, as Arrow's kernels make it."""
        if self._partial_schema is None:
            empty = table.select(list(self.plan.columns)).slice(0, 0)
            self._partial_schema = (
                empty.group_by(list(self.plan.group_by)).aggregate(self._aggregations()).schema
            )
        return self._partial_schema

    # -- folding
    def _fold_partial(self, partial: pa.Table) -> None:
        self._pieces.append(partial)
        self._held += partial.num_rows
        if len(self._pieces) >= 16 or self._held > self.max_rows:
            self._pieces = [self._merged()]
            self._held = self._pieces[0].num_rows
            if self.plan.group_by and self._held > self.max_rows:
                raise ResultTooLargeError(self.max_rows)

    def _merged(self) -> pa.Table:
        table = pa.concat_tables(self._pieces, promote_options="permissive")
        merges = [
            (_partial_name(column, function), _PARTIALS[function][1])
            for column, function in self.specs
        ]
        merged = table.group_by(list(self.plan.group_by)).aggregate(merges)
        names = [*self.plan.group_by, *(_partial_name(c, f) for c, f in self.specs)]
        renamed = {f"{name}_{merge}": name for name, merge in merges}
        return merged.rename_columns([renamed.get(n, n) for n in merged.column_names]).select(names)

    def _project(self, table: pa.Table) -> pa.Table:
        columns = [o.column for o in self.plan.outputs if o.column is not None]
        return table.select(columns).rename_columns([o.name for o in self.plan.outputs])

    def _top(self, table: pa.Table) -> pa.Table:
        plan = self.plan
        if plan.order_by:
            order = [(name, "descending" if desc else "ascending") for name, desc in plan.order_by]
            table = table.sort_by(order)
        return table.slice(0, plan.limit) if plan.limit is not None else table

    def _fold_rows(self, projected: pa.Table) -> None:
        plan = self.plan
        if self.satisfied or projected.num_rows == 0:
            return
        if plan.limit is not None:
            projected = self._top(projected)
        self._pieces.append(projected)
        self._held += projected.num_rows
        if plan.limit is None and self._held > self.max_rows:
            raise ResultTooLargeError(self.max_rows)
        if plan.limit is not None and self._held > 4 * max(plan.limit, 1024):
            combined = self._top(pa.concat_tables(self._pieces))
            self._pieces, self._held = [combined], combined.num_rows

    def result(self) -> pa.Table:
        plan = self.plan
        if plan.aggregated:
            return self._top(self._final_aggregates())
        if not self._pieces:
            fields = [pa.field(o.name, plan.output_types[o.name]) for o in plan.outputs if o.column]
            return pa.schema(fields).empty_table()
        return self._top(pa.concat_tables(self._pieces))

    def _final_aggregates(self) -> pa.Table:
        plan = self.plan
        if self._pieces:
            merged = self._merged()
        else:
            # No unit read yet (cannot happen for a table with units): an empty answer.
            merged = pa.table(
                {_partial_name(c, f): pa.array([], pa.int64()) for c, f in self.specs}
            )
        columns: dict[str, pa.Array | pa.ChunkedArray] = {}
        for out in plan.outputs:
            if out.column is not None:
                columns[out.name] = merged.column(out.column)
                continue
            assert out.aggregate is not None
            column, function = out.aggregate.column, out.aggregate.function
            if function == "avg":
                total = pc.cast(merged.column(_partial_name(column, "sum")), pa.float64())
                count = merged.column(_partial_name(column, "count"))
                average = pc.divide(total, pc.cast(count, pa.float64()))
                columns[out.name] = pc.if_else(
                    pc.equal(count, 0), pa.scalar(None, pa.float64()), average
                )
            else:
                columns[out.name] = merged.column(_partial_name(column, function))
        if not columns:
            return pa.table({})
        return pa.table(columns)
