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
``pyarrow.compute`` filter expression, a projection and partial aggregates that
are computed per unit and merged across units, so one pass over a table's units
answers the query.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import sqlglot
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


@dataclass(frozen=True)
class Condition:
    """A WHERE condition in two equal forms: a ``pyarrow.compute`` expression (the plan
    as Arrow states it) and a function computing the row mask of a table directly with
    compute kernels, which skips the per-batch overhead of an expression scan."""

    expression: pc.Expression
    mask: Callable[[pa.Table], Any]

    @classmethod
    def column(cls, name: str) -> Condition:
        return cls(pc.field(name), lambda table: table.column(name))

    @classmethod
    def value(cls, scalar: pa.Scalar) -> Condition:
        return cls(pc.scalar(scalar), lambda _table: scalar)

    @classmethod
    def call(
        cls, function: str, *arguments: Condition, options: pc.FunctionOptions | None = None
    ) -> Condition:
        expression = pc.Expression._call(function, [a.expression for a in arguments], options)

        def mask(table: pa.Table) -> Any:
            return pc.call_function(function, [a.mask(table) for a in arguments], options)

        return cls(expression, mask)


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
                "is_in", Condition.column(column), options=pc.SetLookupOptions(value_set)
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
        ra = Condition.call("cast", Condition.column(ra_column), options=_TO_FLOAT64)
        dec = Condition.call("cast", Condition.column(dec_column), options=_TO_FLOAT64)

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


class QueryAccumulator:
    """Evaluates a plan on units one at a time and merges what each gives.

    ``add(unit_table)`` filters the unit, projects or aggregates it and folds
    the partial result in; ``result()`` is the final answer (ORDER BY and LIMIT
    applied). ``satisfied`` turns true when a LIMIT without ORDER BY is reached,
    so the query needs no more units. More than ``max_rows`` result rows (or
    groups) raises ``ResultTooLargeError``.
    """

    def __init__(self, plan: QueryPlan, max_rows: int) -> None:
        self.plan = plan
        self.max_rows = max_rows
        self.rows_seen = 0
        self.units = 0
        self._pieces: list[pa.Table] = []
        self._held = 0
        self._specs = _partial_specs(plan)

    @property
    def satisfied(self) -> bool:
        plan = self.plan
        return (
            plan.limit is not None
            and not plan.order_by
            and not plan.aggregated
            and self._held >= plan.limit
        )

    def add(self, table: pa.Table) -> None:
        self.units += 1
        self.rows_seen += table.num_rows
        # Only this query's columns: filtering copies every column of the table it is given.
        table = table.select(list(self.plan.columns))
        if self.plan.row_mask is not None and table.num_rows:
            table = table.filter(self.plan.row_mask(table))
        if self.plan.aggregated:
            self._add_partial(table)
        else:
            self._add_rows(table)

    def _add_partial(self, table: pa.Table) -> None:
        aggregations: list[tuple[Any, ...]] = [
            ([], "count_all") if column is None else (column, function)
            for column, function in self._specs
        ]
        partial = table.group_by(list(self.plan.group_by)).aggregate(aggregations)
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
            for column, function in self._specs
        ]
        merged = table.group_by(list(self.plan.group_by)).aggregate(merges)
        names = [*self.plan.group_by, *(_partial_name(c, f) for c, f in self._specs)]
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

    def _add_rows(self, table: pa.Table) -> None:
        plan = self.plan
        if self.satisfied or table.num_rows == 0:
            return
        projected = self._project(table)
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
                {_partial_name(c, f): pa.array([], pa.int64()) for c, f in self._specs}
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
