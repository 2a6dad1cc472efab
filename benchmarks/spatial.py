"""Spatial catalogs on 100 million synthetic objects: partitioning, picking, cones, crossmatch.

The sky is clumpy, as real catalogs are: a galactic-plane band (35 % of the
objects, Gaussian in galactic latitude, sigma 3 deg), 3,000 clusters (10 %,
sizes log-normal around 0.1 deg) and an isotropic rest. It is generated
vectorised, 5 million rows at a time, into Parquet under
``var/bench/spatial/objects/`` (deterministic, reused; ``--rebuild`` starts
over), then partitioned in this process on the Qserv grid (85 stripes, 12
sub-stripes, 1 arcmin overlap) into ``var/bench/spatial/store``.

Figures:

* ``partition_rows_per_s``: input rows per second of the whole local
  partitioning (read Parquet, locate, overlap, bucket and spill, sort, write the
  chunk and overlap files of ~330 file groups and the director, register them),
  and ``partition_rows_per_s_per_core``: input rows per CPU second of all that
  (user + system, every thread); the transform alone on one in-memory batch:
  ``transform_rows_per_s`` (rows per CPU second, single thread).
* ``object_p50_ms``: pick by id through the director index, warm, in-process;
  ``cone_1arcmin_p50_ms`` and ``cone_1deg_p50_ms``: cones centred on random
  objects, warm; ``http_*``: the same over HTTP (uvicorn on loopback).
* ``crossmatch_*``: two catalogs of ``--xmatch-left`` and ``--xmatch-right``
  objects (most left objects have a right counterpart within 1 arcsec),
  nearest neighbour within 1 arcsec: our in-process chunk-by-chunk match
  against LSDB's ``crossmatch`` on the same data in the same run
  (``ratio_lsdb_to_ours``), the pair counts of both, and a brute-force check
  of ours on a sub-region.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import emit, percentiles_ms
from catalog.sqlite import SQLiteCatalog
from eventindex.config import SpatialSettings
from eventindex.query.crossmatch import MatchMode, MatchSpec, crossmatch
from eventindex.query.objects import ObjectCatalogs, ObjectTable, cone
from eventindex.spatial.chunker import Chunker
from eventindex.spatial.partition import (
    FileGroups,
    PartitionedWriter,
    assign_cells,
    file_pieces,
    input_tables,
    normalize,
    partition_local,
)
from eventindex.spatial.regions import Box, angular_separation
from eventindex.storage import WriteOptions

BENCH_DIR = Path(__file__).resolve().parent.parent / "var" / "bench" / "spatial"
PART_ROWS = 5_000_000
CLUSTERS = 3000
# ICRS → galactic rotation (J2000); its transpose takes galactic vectors to equatorial.
GALACTIC = np.array(
    [
        [-0.0548755604, -0.8734370902, -0.4838350155],
        [0.4941094279, -0.4448296300, 0.7469822445],
        [-0.8676661490, -0.1980763734, 0.4559837762],
    ]
)
# What ``eventindex spark partition`` writes with the default [spatial] settings.
OPTIONS = WriteOptions(
    row_group_rows=SpatialSettings().row_group_rows,
    compression=SpatialSettings().compression,
    compression_level=None,
)


# -- the synthetic sky -----------------------------------------------------------


def _to_radec(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ra = np.degrees(np.arctan2(vectors[:, 1], vectors[:, 0])) % 360.0
    ra[ra >= 360.0] = 0.0
    dec = np.degrees(np.arcsin(np.clip(vectors[:, 2], -1.0, 1.0)))
    return ra, dec


def _unit(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    lon, lat = np.radians(lon), np.radians(lat)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


def _jitter(
    ra: np.ndarray, dec: np.ndarray, sigma: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian offsets of ``sigma`` degrees on the sphere (tangent plane, exact enough)."""
    dec2 = dec + rng.normal(0.0, 1.0, len(dec)) * sigma
    over = np.abs(dec2) > 90.0
    dec2[over] = np.sign(dec2[over]) * 180.0 - dec2[over]
    cos_dec = np.maximum(np.cos(np.radians(dec)), 1e-3)
    ra2 = (ra + rng.normal(0.0, 1.0, len(ra)) * sigma / cos_dec) % 360.0
    ra2[ra2 >= 360.0] = 0.0
    return ra2, np.clip(dec2, -90.0, 90.0)


def sky(
    n: int, rng: np.random.Generator, centres: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` clumpy positions: galactic band, clusters, isotropic rest."""
    kind = rng.choice(3, n, p=[0.35, 0.10, 0.55])
    ra = np.empty(n)
    dec = np.empty(n)
    band = np.flatnonzero(kind == 0)
    galactic = _unit(
        rng.uniform(0.0, 360.0, len(band)), np.clip(rng.normal(0.0, 3.0, len(band)), -90, 90)
    )
    ra[band], dec[band] = _to_radec(galactic @ GALACTIC)
    members = np.flatnonzero(kind == 1)
    which = rng.integers(0, len(centres[0]), len(members))
    ra[members], dec[members] = _jitter(
        centres[0][which], centres[1][which], centres[2][which], rng
    )
    rest = np.flatnonzero(kind == 2)
    ra[rest] = rng.uniform(0.0, 360.0, len(rest))
    dec[rest] = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, len(rest))))
    return ra, dec


def cluster_centres(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.uniform(0.0, 360.0, CLUSTERS),
        np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, CLUSTERS))),
        np.exp(rng.normal(np.log(0.1), 0.7, CLUSTERS)),
    )


def ensure_objects(folder: Path, objects: int, seed: int) -> list[Path]:
    """Parquet parts of ``PART_ROWS`` objects each, written once (resumable)."""
    folder.mkdir(parents=True, exist_ok=True)
    centres = cluster_centres(seed)
    parts = []
    for index, start in enumerate(range(0, objects, PART_ROWS)):
        path = folder / f"part-{index:04d}.parquet"
        parts.append(path)
        if path.exists():
            continue
        n = min(PART_ROWS, objects - start)
        rng = np.random.default_rng([seed, index])
        ra, dec = sky(n, rng, centres)
        table = pa.table(
            {
                "object_id": np.arange(start, start + n, dtype=np.int64),
                "ra": ra,
                "dec": dec,
                "mag": rng.normal(21.0, 1.5, n).astype(np.float32),
            }
        )
        temporary = path.with_suffix(".tmp")
        pq.write_table(table, temporary, compression="zstd", row_group_size=1_000_000)
        temporary.rename(path)
    return parts


# -- partitioning ------------------------------------------------------------------


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ensure_partitioned(
    root: Path, catalog: SQLiteCatalog, name: str, batches: Iterator[pa.Table]
) -> dict[str, Any]:
    """Partition once; the summary (with its timing) is kept beside the store."""
    marker = root / f"partition-{name}.json"
    if marker.exists():
        return dict(json.loads(marker.read_text()))
    with contextlib.suppress(Exception):
        catalog.get_dataset(f"{name}.Object")
        raise RuntimeError(f"{name}.Object exists without its marker: rerun with --rebuild")
    writer = PartitionedWriter(catalog, str(root / "store"), name, "Object", Chunker(), OPTIONS)
    cpu = _cpu_seconds()
    started = time.perf_counter()
    summary = partition_local(
        batches,
        writer,
        memory_bytes=SpatialSettings().partition_memory_bytes,
        spill_dir=str(root),
    )
    wall = time.perf_counter() - started
    result = {
        **summary.to_dict(),
        "wall_s": round(wall, 2),
        "cpu_s": round(_cpu_seconds() - cpu, 2),
    }
    marker.write_text(json.dumps(result))
    return result


def transform_rate(table: pa.Table) -> float:
    """Rows per CPU second of the pure transform (locate, overlap, sort, cut into file
    groups) on one thread."""
    groups = FileGroups(Chunker())
    started = _cpu_seconds()
    primary, overlap = assign_cells(normalize(table), groups.chunker)
    for _ in file_pieces(primary, groups):
        pass
    for _ in file_pieces(overlap, groups):
        pass
    return float(table.num_rows / (_cpu_seconds() - started))


# -- queries -------------------------------------------------------------------------


def _timed(calls: list[Any], fn: Any) -> list[float]:
    durations = []
    for call in calls:
        start = time.perf_counter()
        fn(call)
        durations.append(time.perf_counter() - start)
    return durations


def query_figures(
    table: ObjectTable, ids: np.ndarray, centres: np.ndarray, passes: int = 2
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    get = [int(i) for i in ids]
    assert all(table.get(i) is not None for i in get[:20])
    small = [cone(float(r), float(d), 60.0) for r, d in centres]
    large = [cone(float(r), float(d), 3600.0) for r, d in centres[: max(10, len(centres) // 10)]]
    for label, calls, fn in (
        ("object", get, table.get),
        ("cone_1arcmin", small, table.search),
        ("cone_1deg", large, table.search),
    ):
        for _ in range(passes - 1):
            _timed(calls, fn)  # warm: page cache, key cache, open readers
        figures = percentiles_ms(_timed(calls, fn))
        result[f"{label}_p50_ms"] = figures["p50"]
        result[f"{label}_p99_ms"] = figures["p99"]
    result["cone_1deg_mean_rows"] = round(
        float(np.mean([table.search(c).num_rows for c in large[:10]])), 1
    )
    result["cone_1arcmin_mean_rows"] = round(
        float(np.mean([table.search(c).num_rows for c in small[:100]])), 2
    )
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_figures(root: Path, ids: np.ndarray, centres: np.ndarray) -> dict[str, Any]:
    """The same picks and cones through the web service on loopback."""
    import httpx
    import uvicorn

    from eventindex.config import load_config
    from webservice.app import create_app

    settings = load_config(
        overrides={"store.root": str(root / "store"), "catalog.path": str(root / "catalog.sqlite")},
        environ={},
    )
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            for _ in range(200):
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/v1/health").status_code < 500:
                        break
                time.sleep(0.1)
            get_urls = [(f"/v1/objects/{int(i)}", {"catalog": "sky"}) for i in ids]
            small = [
                ("/v1/objects/cone", {"ra": r, "dec": d, "radius_arcsec": 60.0, "catalog": "sky"})
                for r, d in centres
            ]
            large = [
                (
                    "/v1/objects/cone",
                    {"ra": r, "dec": d, "radius_arcsec": 3600.0, "catalog": "sky", "limit": 100000},
                )
                for r, d in centres[: max(10, len(centres) // 10)]
            ]

            def fetch(call: Any) -> None:
                url, params = (call, None) if isinstance(call, str) else call
                response = client.get(url, params=params)
                if response.status_code != 200:
                    raise RuntimeError(
                        f"{url} {params}: {response.status_code} {response.text[:200]}"
                    )

            result: dict[str, Any] = {}
            for label, calls in (
                ("object", get_urls),
                ("cone_1arcmin", small),
                ("cone_1deg", large),
            ):
                _timed(calls, fetch)
                result[f"http_{label}_p50_ms"] = percentiles_ms(_timed(calls, fetch))["p50"]
            return result
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# -- crossmatch -------------------------------------------------------------------------


def crossmatch_catalogs(left_n: int, right_n: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """Left objects on the clumpy sky; right: 80 % of them moved by ~0.3 arcsec, plus others."""
    rng = np.random.default_rng([seed, 99])
    centres = cluster_centres(seed)
    ra, dec = sky(left_n, rng, centres)
    left = pa.table({"object_id": np.arange(left_n, dtype=np.int64), "ra": ra, "dec": dec})
    twins = np.flatnonzero(rng.random(left_n) < 0.8)
    twin_ra, twin_dec = _jitter(ra[twins], dec[twins], np.full(len(twins), 0.3 / 3600.0), rng)
    extra_ra, extra_dec = sky(max(0, right_n - len(twins)), rng, centres)
    right = pa.table(
        {
            "object_id": np.arange(right_n, dtype=np.int64) + 10**10,
            "ra": np.concatenate([twin_ra, extra_ra])[:right_n],
            "dec": np.concatenate([twin_dec, extra_dec])[:right_n],
        }
    )
    return left, right


def lsdb_crossmatch(left: pa.Table, right: pa.Table, radius_arcsec: float) -> dict[str, Any]:
    """LSDB's nearest-neighbour crossmatch of the same tables, timed without its catalog
    build (as ours is timed without partitioning)."""
    try:
        import lsdb
    except ImportError as exc:
        return {"lsdb_error": f"lsdb not installed ({exc}); pip install lsdb to compare"}
    started = time.perf_counter()
    from_dataframe: Any = getattr(lsdb, "from_dataframe")  # noqa: B009 - untyped optional package
    left_catalog = from_dataframe(
        left.to_pandas(), catalog_name="left", ra_column="ra", dec_column="dec"
    )
    right_catalog = from_dataframe(
        right.to_pandas(),
        catalog_name="right",
        ra_column="ra",
        dec_column="dec",
        margin_threshold=radius_arcsec,
    )
    built = time.perf_counter()
    matched = left_catalog.crossmatch(
        right_catalog, radius_arcsec=radius_arcsec, n_neighbors=1, suffixes=("_l", "_r")
    ).compute()
    done = time.perf_counter()
    return {
        "lsdb_version": getattr(lsdb, "__version__", "?"),
        "lsdb_build_s": round(built - started, 2),
        "lsdb_crossmatch_s": round(done - built, 2),
        "lsdb_pairs": len(matched),
    }


def crossmatch_figures(
    root: Path, catalog: SQLiteCatalog, left_n: int, right_n: int, seed: int, with_lsdb: bool
) -> dict[str, Any]:
    left, right = crossmatch_catalogs(left_n, right_n, seed)
    tag = f"{left_n}x{right_n}"
    partition = {
        side: ensure_partitioned(root, catalog, f"xmatch_{side}_{tag}", iter([table]))
        for side, table in (("left", left), ("right", right))
    }
    tables = ObjectCatalogs(catalog)
    lt, rt = tables.table(f"xmatch_left_{tag}"), tables.table(f"xmatch_right_{tag}")
    spec = MatchSpec(1.0, MatchMode.NEAREST)
    crossmatch(lt, rt, spec, region=Box(10.0, 11.0, 0.0, 1.0))  # warm imports
    started = time.perf_counter()
    pairs = crossmatch(lt, rt, spec)
    ours = time.perf_counter() - started
    # Brute force on a sub-region: every left object there against every right object near it.
    box = Box(250.0, 270.0, -35.0, -20.0)  # crosses the galactic plane: dense
    l_in = box.contains(left["ra"].to_numpy(), left["dec"].to_numpy())
    near = Box(249.9, 270.1, -35.1, -19.9).contains(right["ra"].to_numpy(), right["dec"].to_numpy())
    lra, ldec = left["ra"].to_numpy()[l_in], left["dec"].to_numpy()[l_in]
    rra, rdec = right["ra"].to_numpy()[near], right["dec"].to_numpy()[near]
    rid = right["object_id"].to_numpy()[near]
    order = np.argsort(rdec)
    rra, rdec, rid = rra[order], rdec[order], rid[order]
    lid = left["object_id"].to_numpy()[l_in]
    expected = {}
    for i, (r, d) in enumerate(zip(lra, ldec, strict=True)):
        lo, hi = np.searchsorted(rdec, [d - 1 / 3600, d + 1 / 3600])
        if hi > lo:
            dist = angular_separation(r, d, rra[lo:hi], rdec[lo:hi])
            best = int(np.lexsort((rid[lo:hi], dist))[0])
            if dist[best] <= 1 / 3600:
                expected[int(lid[i])] = int(rid[lo:hi][best])
    sub = crossmatch(lt, rt, spec, region=box)
    got = dict(zip(sub["left_id"].to_pylist(), sub["right_id"].to_pylist(), strict=True))
    result: dict[str, Any] = {
        "crossmatch_left_rows": left_n,
        "crossmatch_right_rows": right_n,
        "crossmatch_radius_arcsec": 1.0,
        "crossmatch_s": round(ours, 2),
        "crossmatch_pairs": pairs.num_rows,
        "crossmatch_partition_s": round(sum(p["wall_s"] for p in partition.values()), 2),
        "crossmatch_subregion_left_rows": int(l_in.sum()),
        "crossmatch_subregion_identical_to_brute_force": got == expected,
    }
    if with_lsdb:
        lsdb_result = lsdb_crossmatch(left, right, 1.0)
        result.update(lsdb_result)
        if "lsdb_crossmatch_s" in lsdb_result:
            result["ratio_lsdb_to_ours"] = round(lsdb_result["lsdb_crossmatch_s"] / ours, 2)
            result["ratio_lsdb_to_ours_with_build"] = round(
                (lsdb_result["lsdb_crossmatch_s"] + lsdb_result["lsdb_build_s"])
                / (ours + result["crossmatch_partition_s"]),
                2,
            )
    return result


# -- main ---------------------------------------------------------------------------------


def run(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="bench spatial", description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=100_000_000)
    parser.add_argument("--queries", type=int, default=500, help="Picks and 1-arcmin cones timed.")
    parser.add_argument("--xmatch-left", type=int, default=1_000_000)
    parser.add_argument("--xmatch-right", type=int, default=5_000_000)
    parser.add_argument("--no-lsdb", action="store_true")
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--no-crossmatch", action="store_true")
    parser.add_argument(
        "--only-crossmatch", action="store_true", help="Skip the big sky: crossmatch figures only."
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data", default=str(BENCH_DIR), help="Where data is built and reused.")
    parser.add_argument("--rebuild", action="store_true", help="Delete the data and start over.")
    parser.add_argument(
        "--repartition",
        action="store_true",
        help="Keep the generated objects but partition them again (drops the store).",
    )
    args = parser.parse_args(argv)

    root = Path(args.data) / f"sky-{args.objects}"
    if args.rebuild and root.exists():
        shutil.rmtree(root)
    if args.repartition and not args.only_crossmatch:
        shutil.rmtree(root / "store", ignore_errors=True)
        for stale in ("partition-sky.json", "catalog.sqlite"):
            (root / stale).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    parts = (
        [] if args.only_crossmatch else ensure_objects(root / "objects", args.objects, args.seed)
    )
    generate_s = time.perf_counter() - started
    catalog = SQLiteCatalog(str(root / "catalog.sqlite"))
    if args.only_crossmatch:
        try:
            return crossmatch_figures(
                root, catalog, args.xmatch_left, args.xmatch_right, args.seed, not args.no_lsdb
            )
        finally:
            catalog.close()
    try:
        first = pq.read_table(parts[0])
        transform = transform_rate(first.slice(0, 2_000_000))
        # Read as `eventindex spark partition --local` reads a Parquet folder.
        partition = ensure_partitioned(root, catalog, "sky", input_tables(str(root / "objects")))
        rng = np.random.default_rng(args.seed + 7)
        ids = rng.integers(0, args.objects, args.queries)
        picks = rng.integers(0, first.num_rows, args.queries)
        centres = np.stack([first["ra"].to_numpy()[picks], first["dec"].to_numpy()[picks]], axis=1)
        table = ObjectCatalogs(catalog).table("sky")
        cpu_share = partition["cpu_s"] / partition["wall_s"]
        result: dict[str, Any] = {
            "objects": args.objects,
            "grid": "85 stripes x 12 sub-stripes, overlap 60 arcsec",
            "generate_s": round(generate_s, 1),
            "partition_rows_per_s": round(partition["rows"] / partition["wall_s"]),
            "partition_rows_per_s_per_core": round(partition["rows"] / partition["cpu_s"]),
            "partition_cpu_cores_used": round(cpu_share, 2),
            "partition_wall_s": partition["wall_s"],
            "partition_overlap_rows": partition["overlap_rows"],
            "partition_files": partition["files"],
            "partition_gb": round(partition["bytes"] / 1e9, 2),
            "transform_rows_per_s": round(transform),
            **query_figures(table, ids, centres),
        }
        if not args.no_http:
            result.update(http_figures(root, ids[:200], centres[:200]))
        if not args.no_crossmatch:
            result.update(
                crossmatch_figures(
                    root, catalog, args.xmatch_left, args.xmatch_right, args.seed, not args.no_lsdb
                )
            )
        result["targets"] = {
            "partition_rows_per_s_per_core": 1_000_000,
            "object_p50_ms": 2.0,
            "cone_1arcmin_p50_ms": 20.0,
            "cone_1deg_p50_ms": 500.0,
        }
        result["load_average"] = [round(v, 2) for v in os.getloadavg()]
        return result
    finally:
        catalog.close()


if __name__ == "__main__":
    emit(run(sys.argv[1:]))
