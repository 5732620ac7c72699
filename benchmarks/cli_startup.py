"""CPU seconds of `saekit --help` and `saekit train --help`, against the same help with every stage module imported first.

The baseline is what `--help` cost when the CLI imported its stages (torch, transformers,
h5py, matplotlib) at registration: the same `main()` after `import saekit.train, ...`.
CPU time (user + sys of the child process) rather than wall time, so the ratio holds on a
loaded machine.  Usage: python benchmarks/cli_startup.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys

STAGES = ("saekit.harvest", "saekit.train", "saekit.splice", "saekit.inmodel.finetune", "saekit.inmodel.e2e", "saekit.pipeline",
          "saekit.analysis.analyze", "saekit.analysis.steer", "saekit.analysis.intervene", "saekit.toy.train", "saekit.interop")


def cpu_of(code: str, argv: list[str]) -> float:
    """User + sys seconds of one fresh interpreter running `code` with sys.argv = ['saekit', *argv]."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    prog = f"import sys\nsys.argv = ['saekit', *{argv!r}]\n{code}\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
    subprocess.run([sys.executable, "-c", prog], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    lazy = "from saekit_cli.main import main"
    eager = "".join(f"import {m}\n" for m in STAGES) + lazy
    print(f"{'command':<22} {'now (cpu s)':>12} {'eager imports (cpu s)':>22} {'ratio':>7}")
    for argv in (["--help"], ["train", "--help"], ["harvest", "--help"]):
        now = statistics.median(cpu_of(lazy, argv) for _ in range(args.repeat))
        base = statistics.median(cpu_of(eager, argv) for _ in range(args.repeat))
        print(f"{'saekit ' + ' '.join(argv):<22} {now:>12.2f} {base:>22.2f} {base / now:>6.1f}x")


if __name__ == "__main__":
    main()
