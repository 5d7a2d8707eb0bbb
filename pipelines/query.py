"""SQL over the job's output tables with DuckDB: ``earthgpt query "SELECT ..." --root OUT``.

Each table (``scenes``, ``tiles``, ``detections``, ``errors``, ``runs``) is a view over its GeoParquet files with
Hive partitions (``collection``, ``date``) as columns, so ``WHERE collection = ... AND date >= ...`` prunes files.
DuckDB's ``spatial`` extension is loaded from its PyPI wheel (no download), so ``geometry`` is a ``GEOMETRY`` and
``ST_*`` functions work; for ``s3://`` roots ``httpfs`` is loaded the same way and an S3 secret is made from the usual
``AWS_*`` environment variables (``AWS_ENDPOINT_URL`` for S3-compatible stores).

Example::

    earthgpt query "SELECT label, count(*) FROM detections GROUP BY label" --root demo-out/outputs
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

import duckdb

from pipelines.sinks import SCHEMAS, TABLES, OutputStore


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


def connect(root: str, env: Mapping[str, str] | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view per output table under ``root``.

    Args:
        root: The job's output root (local folder or ``s3://bucket/prefix``).
        env: Environment for S3 credentials and endpoint (default ``os.environ``).

    Returns:
        The connection; tables not written yet are empty views with their documented columns.
    """
    env = os.environ if env is None else env
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    con.execute(f"LOAD '{_extension_path('spatial')}'")
    remote = "://" in root and not root.startswith("file://")
    if remote:
        con.execute(f"LOAD '{_extension_path('httpfs')}'")
        _s3_secret(con, env)
    store = OutputStore(root)
    for table in TABLES:
        if store.glob(f"{table}/**/*.parquet"):
            pattern = store.url(f"{table}/**/*.parquet").replace("'", "''")
            con.execute(
                f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{pattern}', hive_partitioning = true, "
                f"union_by_name = true)"
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


def cli(argv: list[str] | None = None) -> int:
    """``earthgpt query SQL --root ROOT``: print the result as a table, CSV or JSON lines."""
    parser = argparse.ArgumentParser(
        prog="earthgpt query",
        description="SQL (DuckDB, with the spatial extension) over the output tables: scenes, tiles, detections, "
        "errors, runs. Partition columns: collection, date.",
    )
    parser.add_argument("sql", help='e.g. "SELECT label, count(*) FROM detections GROUP BY label"')
    parser.add_argument("--root", default=os.environ.get("EARTHGPT_OUTPUT", "demo-out/outputs"),
                        help="output root (default: $EARTHGPT_OUTPUT or demo-out/outputs)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--max-rows", type=int, default=40, help="rows shown in table format")
    args = parser.parse_args(argv)
    if "://" not in args.root and not Path(args.root).is_dir():
        print(f"earthgpt query: no output folder {args.root!r} (run `earthgpt demo` or pass --root)", file=sys.stderr)
        return 2
    try:
        rel = query(args.root, args.sql)
    except duckdb.Error as exc:
        print(f"earthgpt query: {exc}", file=sys.stderr)
        return 1
    if args.format == "table":
        rel.show(max_rows=args.max_rows, max_width=200)
    elif args.format == "csv":
        rel.df().to_csv(sys.stdout, index=False)
    else:
        for record in rel.df().to_dict(orient="records"):
            print(json.dumps(record, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
