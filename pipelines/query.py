"""SQL over the job's output tables with DuckDB: ``earthgpt query "SELECT ..." --root OUT``.

Each table (``scenes``, ``tiles``, ``detections``, ``errors``, ``runs``) is a view over its committed GeoParquet
files (those of units with a ledger record, as :class:`pipelines.results.Outputs` lists them; never ``_staging/``)
with Hive partitions (``collection``, ``date``) as columns, so ``WHERE collection = ... AND date >= ...`` prunes
files before any is opened (on S3 too: ``EXPLAIN ANALYZE`` shows "Scanning Files: k/n"). Schemas are unioned by
name only when a table's oldest and newest files differ (``union_by_name`` reads every file's footer).
DuckDB's ``spatial`` extension is loaded from its PyPI wheel (no download), so ``geometry`` is a ``GEOMETRY`` and
``ST_*`` functions work; for ``s3://`` roots ``httpfs`` is loaded the same way and an S3 secret is made from the usual
``AWS_*`` environment variables (``AWS_ENDPOINT_URL`` for S3-compatible stores).

Example::

    earthgpt query "SELECT label, count(*) FROM detections GROUP BY label" --root demo-out/outputs
    earthgpt query "SELECT * FROM detections WHERE label = 'ship'" --format geojson --out ships.geojson
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import duckdb

from pipelines.archive.store import SCHEMAS, TABLES
from pipelines.cli import add_root_argument

log = logging.getLogger(__name__)

FORMATS = ("table", "csv", "json", "parquet", "geojson")


def _extension_path(name: str) -> str:
    """The extension file shipped in the ``duckdb-extension-<name>`` wheel for this DuckDB version."""
    module = importlib.import_module(f"duckdb_extension_{name}")
    path = Path(module.__file__ or "").parent / "extensions" / f"v{duckdb.__version__}" / f"{name}.duckdb_extension"
    if not path.exists():
        raise RuntimeError(f"no {name} extension for duckdb {duckdb.__version__} at {path}; "
                           f"pip install duckdb-extension-{name}=={duckdb.__version__}")
    return str(path)


def _s3_secret(con: duckdb.DuckDBPyConnection, env: Mapping[str, str]) -> None:
    options = {"TYPE": "s3", "URL_STYLE": "path"}
    if env.get("AWS_ACCESS_KEY_ID"):
        options["KEY_ID"] = env["AWS_ACCESS_KEY_ID"]
        options["SECRET"] = env.get("AWS_SECRET_ACCESS_KEY", "")
    if env.get("AWS_SESSION_TOKEN"):
        options["SESSION_TOKEN"] = env["AWS_SESSION_TOKEN"]
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        options["REGION"] = region
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        parts = urlsplit(endpoint)
        options["ENDPOINT"] = parts.netloc or parts.path
        options["USE_SSL"] = "true" if parts.scheme == "https" else "false"
    else:
        options["URL_STYLE"] = "vhost"
    body = ", ".join(f"{k} {v}" if k in ("TYPE", "USE_SSL") else f"{k} '{v}'" for k, v in options.items())
    con.execute(f"CREATE OR REPLACE SECRET earthgpt_s3 ({body})")


def _sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def connect(root: str, env: Mapping[str, str] | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view per output table under ``root``, over committed files only.

    Args:
        root: The job's output root (local folder or ``s3://bucket/prefix``).
        env: Environment for S3 credentials and endpoint (default ``os.environ``).

    Returns:
        The connection; tables with no committed file yet are empty views with their documented columns.
    """
    from pipelines.results.outputs import Outputs

    env = os.environ if env is None else env
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    con.execute(f"LOAD '{_extension_path('spatial')}'")
    remote = "://" in root and not root.startswith("file://")
    if remote:
        con.execute(f"LOAD '{_extension_path('httpfs')}'")
        _s3_secret(con, env)
    outputs = Outputs(root)
    for table in TABLES:
        files = outputs.files(table)
        if files:
            con.execute(
                f"CREATE VIEW {table} AS SELECT * FROM read_parquet({_sql_list([outputs.store.url(f) for f in files])}, "
                f"hive_partitioning = true{'' if outputs.schema_is_uniform(table) else ', union_by_name = true'})"
            )
        else:
            empty = SCHEMAS[table].empty_table()
            con.register(f"_{table}_empty", empty)
            extra = "" if table == "runs" else ", NULL::VARCHAR AS collection, NULL::DATE AS date"
            con.execute(f"CREATE VIEW {table} AS SELECT *, NULL::GEOMETRY AS geometry{extra} FROM _{table}_empty")
    return con


def query(root: str, sql: str) -> duckdb.DuckDBPyRelation:
    """Run one SQL statement over the output tables under ``root``.

    Args:
        root: The output root.
        sql: A DuckDB SQL query naming ``scenes``, ``tiles``, ``detections``, ``errors``, ``runs``.

    Returns:
        The result relation (``.df()``, ``.arrow()``, ``.fetchall()``).
    """
    return connect(root).sql(sql)


def run_query(root: str, sql: str, fmt: str = "table", out: str | None = None, max_rows: int = 40) -> None:
    """Run one SQL statement over the output tables under ``root`` and write its result: printed by DuckDB for
    ``table`` to standard output, else as :func:`write_frame` writes a frame.

    The views name the files listed when they are made. A run of the job that publishes meanwhile (a fold of its
    files, a copy-on-write of an updated scene) can delete one of them before DuckDB reads it: the statement then
    fails with an I/O error and is run once more over a fresh listing. Nothing is written before a statement has
    run to its end.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    frame = None
    for attempt in (0, 1):
        try:
            rel = query(root, sql)
            if fmt == "table" and out is None:
                rel.show(max_rows=max_rows, max_width=200)  # runs the statement to its end, then prints
                return
            frame = to_frame(rel)
            break
        # DuckDB's (HTTP errors included: a 404 of a deleted S3 object), or the footer read of the views' schema
        except (duckdb.IOException, FileNotFoundError):
            if attempt:
                raise
            log.info("a listed file could not be read; listing the tables again", exc_info=True)
    write_frame(frame, fmt, out, max_rows)  # outside: an error writing the result is not retried


def to_frame(rel: duckdb.DuckDBPyRelation) -> Any:
    """A query result as a GeoDataFrame when it has a geometry column (WGS84), else a DataFrame."""
    import geopandas as gpd

    arrow = rel.to_arrow_table()
    geometry = [f.name for f in arrow.schema if (f.metadata or {}).get(b"ARROW:extension:name") == b"geoarrow.wkb"]
    return gpd.GeoDataFrame.from_arrow(arrow) if geometry else arrow.to_pandas()


def write_frame(frame: Any, fmt: str, out: str | None, max_rows: int = 40) -> None:
    """Write a (Geo)DataFrame as a table, CSV, JSON lines, (Geo)Parquet or GeoJSON, to ``out`` or standard output.

    Geometry columns become WKT in ``table``, ``csv`` and ``json``; ``parquet`` keeps them as GeoParquet 1.1;
    ``geojson`` needs one (the active geometry is the features' geometry, in WGS84).

    Raises:
        ValueError: An unknown format, ``parquet`` without ``out``, or ``geojson`` of a frame without geometry.
    """
    import geopandas as gpd

    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "parquet" and out is None:
        raise ValueError("--format parquet writes a file: give --out FILE")
    spatial = isinstance(frame, gpd.GeoDataFrame) and frame.geometry.name in frame.columns
    if fmt == "geojson" and not spatial:
        raise ValueError("--format geojson: the result has no geometry column (select one, e.g. geometry)")
    if fmt == "parquet":
        if spatial:
            frame.to_parquet(out, index=False, schema_version="1.1.0", write_covering_bbox=True)
        else:
            frame.to_parquet(out, index=False)
        return
    if fmt == "geojson":
        text = frame.to_crs(4326).to_json(drop_id=True, default=str)
    else:
        flat = frame.to_wkt() if spatial else frame
        if fmt == "csv":
            text = flat.to_csv(index=False)
        elif fmt == "json":
            text = "".join(json.dumps(r, default=str) + "\n" for r in flat.to_dict(orient="records"))
        else:
            text = flat.to_string(index=False, max_rows=max_rows, max_colwidth=60) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        Path(out).write_text(text)


def cli(argv: list[str] | None = None) -> int:
    """``earthgpt query SQL --root ROOT [--format F] [--out FILE]``: run one query, print or write its result."""
    parser = argparse.ArgumentParser(
        prog="earthgpt query",
        description="SQL (DuckDB, with the spatial extension) over the committed output tables: scenes, tiles, "
        "detections, errors, runs. Partition columns: collection, date.",
    )
    parser.add_argument("sql", help='e.g. "SELECT label, count(*) FROM detections GROUP BY label"')
    add_root_argument(parser)
    parser.add_argument("--format", choices=FORMATS, default="table",
                        help="table (default), csv, json (one object per line), parquet (GeoParquet when the "
                        "result has a geometry; needs --out), geojson (needs a geometry column)")
    parser.add_argument("--out", help="write the result to this file instead of standard output")
    parser.add_argument("--max-rows", type=int, default=40, help="rows shown in table format")
    args = parser.parse_args(argv)
    if "://" not in args.root and not Path(args.root).is_dir():
        print(f"earthgpt query: no output folder {args.root!r} (run `earthgpt demo` or pass --root)", file=sys.stderr)
        return 2
    try:
        run_query(args.root, args.sql, args.format, args.out, args.max_rows)
    except (duckdb.Error, OSError) as exc:
        print(f"earthgpt query: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"earthgpt query: {exc}", file=sys.stderr)
        return 2
    if args.out:
        print(f"earthgpt query: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
