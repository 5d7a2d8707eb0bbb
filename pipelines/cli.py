"""The ``earthgpt`` command line.

Each subcommand lives in its own module and parses its own arguments, so ``earthgpt --help`` stays fast (no torch or
Ray import) and a subcommand's options are documented next to the code that uses them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module exposing ``cli(argv) -> int``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pipelines.archive.demo", "build the toy-world archive and run the whole job on it locally (embedded default)"),
    "run": ("pipelines.archive.job", "run the archive inference job from a YAML config"),
    "train": ("pipelines.train", "instruction-tune EarthGPT on Ray Train from a YAML config"),
    "eval": ("pipelines.evaluate", "evaluate a checkpoint on MMRS-1M-format data"),
    "catalog": ("pipelines.catalog_cli", "STAC catalog tools: supported collections, check a catalog, ingest COGs, toy world"),
    "query": ("pipelines.query", "SQL over the output tables (DuckDB); table, CSV, JSON, GeoParquet, GeoJSON"),
    "similar": ("pipelines.results.similar", "the tiles most similar to one tile (embedding cosine similarity)"),
    "render": ("pipelines.results.render", "a PNG of a tile or scene with its detections and captions"),
    "report": ("pipelines.results.report", "one self-contained HTML report of a run"),
    "submit": ("pipelines.submit", "submit the archive or training job to a Ray cluster (Ray Jobs API)"),
    "jobs": ("pipelines.jobs", "list, watch, and stop jobs on a Ray cluster (Ray Jobs API)"),
}


DEFAULT_ROOT = "demo-out/outputs"  # where `earthgpt demo` writes its tables


def add_root_argument(parser: argparse.ArgumentParser, *, default_from_env: bool = True, extra: str = "") -> None:
    """The ``--root`` option shared by the commands that read the output tables.

    Args:
        parser: The subcommand's parser.
        default_from_env: Default to ``$EARTHGPT_OUTPUT`` or the demo's root; otherwise ``None`` (the command resolves
            it, e.g. from a config first).
        extra: Text put before the environment fallback in the help, e.g. "the config's output.root, else".
    """
    parser.add_argument(
        "--root",
        default=os.environ.get("EARTHGPT_OUTPUT", DEFAULT_ROOT) if default_from_env else None,
        help=f"output root (default: {extra + ' ' if extra else ''}$EARTHGPT_OUTPUT or {DEFAULT_ROOT})",
    )


def default_root() -> str:
    """``$EARTHGPT_OUTPUT``, else the demo's output root."""
    return os.environ.get("EARTHGPT_OUTPUT", DEFAULT_ROOT)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="earthgpt",
        description="Caption and detect objects in every tile of a STAC-catalogued Earth-observation archive.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\nRun `earthgpt COMMAND --help` for a command's options.",
    )
    parser.add_argument("command", nargs="?", help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``earthgpt`` console script."""
    parser = _parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 0
    if ns.command not in COMMANDS:
        parser.error(f"unknown command {ns.command!r}; choose one of: {', '.join(COMMANDS)}")
    module_name, _ = COMMANDS[ns.command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            print(f"earthgpt {ns.command}: not available in this version", file=sys.stderr)
            return 2
        raise
    return int(module.cli(ns.args) or 0)


if __name__ == "__main__":
    sys.exit(main())
