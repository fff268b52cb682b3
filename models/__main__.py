"""python -m onnxopt.zoo list | fetch NAME [--force]"""

from __future__ import annotations

import argparse
import sys

from onnxopt.errors import OnnxoptError

from . import describe, entries, fetch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onnxopt.zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="show the models in the manifest")
    fetch_cmd = sub.add_parser("fetch", help="download a model into the cache and print its path")
    fetch_cmd.add_argument("name")
    fetch_cmd.add_argument("--force", action="store_true", help="download even if cached")
    args = parser.parse_args(argv)

    try:
        if args.command == "list":
            for e in entries().values():
                print(describe(e))
        else:
            print(fetch(args.name, force=args.force))
    except OnnxoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
