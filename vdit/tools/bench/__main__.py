"""`python -m vdit.tools.bench NAME [--json] [--quick] [--set key=value ...]` (see __init__.py)."""

import argparse
import ast
import json
import platform
import sys
import time

from vdit.tools import bench


def _machine() -> dict:
  import os  # noqa: PLC0415

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "python": platform.python_version(),
    "load_average_1m": round(os.getloadavg()[0], 2),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vdit.tools.bench", description=__doc__)
  parser.add_argument("name", choices=sorted(bench.BENCHMARKS))
  parser.add_argument("--json", action="store_true", help="print only JSON to stdout")
  parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="KEY=VALUE",
    help="benchmark option (Python literal values)",
  )
  args = parser.parse_args(argv)
  options = {"quick": args.quick}
  for item in args.set:
    key, sep, value = item.partition("=")
    if not sep:
      parser.error(f"--set {item!r} is not KEY=VALUE")
    try:
      options[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[key] = value
  start = time.time()
  result = bench.get(args.name)(options)
  report = {
    "benchmark": args.name,
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "machine": _machine(),
    "seconds": round(time.time() - start, 1),
    "options": options,
    "results": result,
  }
  text = json.dumps(report, indent=None if args.json else 2)
  print(text, file=sys.stdout)
  return 0


if __name__ == "__main__":
  sys.exit(main())
