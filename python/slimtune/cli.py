"""The ``slimtune`` command line: ``slimtune demo|bench|info ...`` (and ``python -m slimtune``)."""

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="slimtune", description="slimtune command line")
    parser.add_argument("command", choices=["demo", "bench", "info"], help="what to run")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if command == "bench":
        from .bench.__main__ import main as bench_main

        return bench_main(rest, prog="slimtune bench")
    if command == "info":
        import json

        import slimtune

        print(json.dumps(slimtune.build_info(), indent=2))
        return 0
    parser.error(f"unknown command {command!r}")
    return 2
