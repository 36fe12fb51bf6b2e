"""How often a process that reads Parquet and exits aborts in teardown ("terminate called without an
active exception", apache/arrow#34314), for pq.read_table and for the plain pq.ParquetFile reader that
nodekd_ray.sweep uses. Each child reads 12 small files from bytes, the reader a temporary as in the
library, and exits, with busy processes beside it (the abort needs a loaded machine: `nodekd verify`
aborted in none of 40 idle runs, in 2 of 60 beside three busy processes).

    .venv/bin/python benchmarks/probes/arrow_exit_abort.py --runs 60 --busy 3

Prints, per reader, the aborted runs out of --runs. Not a test: the rate depends on load and timing.
"""
import argparse
import os
import subprocess
import sys
import tempfile

CHILD = """
import glob, sys, pyarrow as pa, pyarrow.parquet as pq
for p in sorted(glob.glob(sys.argv[2] + "/**/*.parquet", recursive=True)):
    if sys.argv[1] == "read_table":
        pq.read_table(pa.BufferReader(open(p, "rb").read()))
    else:
        pq.ParquetFile(pa.BufferReader(open(p, "rb").read())).read(use_threads=False)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--busy", type=int, default=3, help="busy-loop processes beside each run")
    ap.add_argument("--folder", help="read the Parquet files under this folder (a sweep's storage) instead")
    args = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as d:
        d = args.folder or d
        for i in range(0 if args.folder else 12):   # the size of a tiny sweep's attack chunks: 6 rows of a dozen columns
            pq.write_table(pa.table({f"c{j}": [float(i + j + r) for r in range(6)] for j in range(12)}),
                           os.path.join(d, f"{i}.parquet"))
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
        try:
            for reader in ("read_table", "ParquetFile"):
                aborted = 0
                for _ in range(args.runs):
                    r = subprocess.run([sys.executable, "-c", CHILD, reader, d], capture_output=True, text=True)
                    aborted += r.returncode != 0
                print(f"{reader}: {aborted} of {args.runs} runs aborted at exit "
                      f"(pyarrow {pa.__version__}, {args.busy} busy processes, {os.cpu_count()} CPUs)", flush=True)
        finally:
            for p in busy:
                p.kill()


if __name__ == "__main__":
    main()
