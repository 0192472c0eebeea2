r"""Runs `python -m vdit.main` as N cooperating JAX processes on this machine (CPU, loopback).

  python launch/local.py --num_processes=2 --devices_per_process=4 -- \
      --config=configs/vdit/shapes.py:tiny --workdir=runs/mp

Each process gets `--distributed` with the coordinator on 127.0.0.1, its process id, and
`devices_per_process` simulated CPU devices (so N·D devices in all); collectives go over gloo.
This is the multi-host code path of a TPU pod (one process per host, each loading its own share
of the data, orbax writing checkpoints collectively), runnable on a laptop.

Process 0's stdout is passed through; every process also logs to `<log_dir>/process_<i>.log`
and writes its pid to `<log_dir>/process_<i>.pid`. SIGTERM/SIGINT to the launcher is forwarded
to all processes (a simulated maintenance event: they checkpoint and exit). If one process
fails, the others are stopped (they would wait forever in a collective). The exit code is the
first non-zero one, else 0.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(index: int, count: int, devices: int, port: int) -> dict[str, str]:
  """Environment of process `index`: coordinator, id, CPU devices."""
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env.update(
    XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
    JAX_PLATFORMS="cpu",
    VDIT_DISTRIBUTED="1",
    VDIT_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
    VDIT_NUM_PROCESSES=str(count),
    VDIT_PROCESS_ID=str(index),
    PYTHONUNBUFFERED="1",
  )
  return env


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--port", type=int, default=0, help="coordinator port; 0 = a free one")
  parser.add_argument("--log_dir", default=None, help="default: <workdir>/logs")
  parser.add_argument("--module", default="vdit.main", help="python -m MODULE to run")
  parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then the module's flags")
  opts = parser.parse_args(argv)
  args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
  if opts.num_processes < 1 or opts.devices_per_process < 1:
    parser.error(
      f"--num_processes={opts.num_processes} and --devices_per_process="
      f"{opts.devices_per_process} must be >= 1"
    )
  log_dir = opts.log_dir
  if log_dir is None:
    workdir = next((a.split("=", 1)[1] for a in args if a.startswith("--workdir=")), None)
    if workdir is None:
      parser.error("pass --log_dir or a --workdir=DIR flag for the module")
    log_dir = os.path.join(workdir, "logs")
  os.makedirs(log_dir, exist_ok=True)
  port = opts.port or free_port()

  procs = []
  for i in range(opts.num_processes):
    log = open(os.path.join(log_dir, f"process_{i}.log"), "w")  # closed when the launcher exits
    proc = subprocess.Popen(
      [sys.executable, "-m", opts.module, *args],
      cwd=REPO,
      env=process_env(i, opts.num_processes, opts.devices_per_process, port),
      stdout=None if i == 0 else log,
      stderr=log,
    )
    with open(os.path.join(log_dir, f"process_{i}.pid"), "w") as f:
      f.write(str(proc.pid))
    procs.append(proc)

  def forward(signum, frame):
    del frame
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  signal.signal(signal.SIGTERM, forward)
  signal.signal(signal.SIGINT, forward)

  code, failed_at = 0, None
  while any(p.poll() is None for p in procs):
    time.sleep(0.2)
    bad = [p.returncode for p in procs if p.returncode not in (None, 0)]
    if bad and failed_at is None:
      code, failed_at = bad[0], time.time()
    if failed_at is not None and time.time() - failed_at > 10:  # grace period, then stop all
      for p in procs:
        if p.poll() is None:
          p.kill()
  codes = [p.wait() for p in procs]
  code = code or next((c for c in codes if c), 0)
  if code:
    print(f"launch/local.py: exit codes {codes}; logs in {log_dir}", file=sys.stderr)
  return code


if __name__ == "__main__":
  sys.exit(main())
