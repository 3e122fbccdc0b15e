"""Per-kernel table of one training step from Nsight Compute's CSV: each kernel's launches and summed
gpu__time_duration, largest first, with its share of the step. Writes what the results' ncu_*.txt files hold.

    export HETNET_CACHE_DIR=/tmp/hc      # the algorithms of a run without ncu, read by the run under it
    python benchmarks/kernels/profile_step.py --model cifar-wide --batch 1024 --precision bf16 --quiet
    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv \\
        python benchmarks/kernels/profile_step.py --model cifar-wide --batch 1024 --precision bf16 --quiet > ncu.csv
    python benchmarks/kernels/ncu_table.py ncu.csv --title "H100, cifar-wide bf16 1024, <commit>" > ncu.txt

--pipe: instead one line a launch from ncu's plain (not --csv) output of --metrics with the tensor pipe's active
cycles (sm__pipe_tensor_op_hmma_cycles_active..., which counts wgmma's on sm_90: the gmma metric reads n/a there),
SM and L2 throughput and the stall reasons (smsp__average_warps_issue_stalled_<reason>_per_issue_active.ratio):
scripts/gpu-ab's NCU_PIPE runs, a markdown table.

--source: where each kernel's warps are, from ncu's warp-state sampling per SASS instruction (--section
SourceCounters --page source --print-source sass --csv): per kernel, the samples of each opcode (the mnemonic's
first part) and the instructions holding the most, each with its largest stall reasons, as markdown.
"""
from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from collections import defaultdict

UNITS_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3, "s": 1e6, "second": 1e6}


def kernel_times(text: str) -> dict[str, tuple[int, float]]:
    """{kernel name (60 characters, 'void ' dropped): (launches, microseconds)} from ncu's --csv output (the lines
    before its header, ncu's own messages and the program's output, are skipped)."""
    start = text.find('"ID"')
    if start < 0:
        raise ValueError("no ncu CSV header (\"ID\", ...) in the input")
    count, total = defaultdict(int), defaultdict(float)
    for row in csv.DictReader(io.StringIO(text[start:])):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = re.sub(r"^void ", "", row["Kernel Name"])[:60]
        scale = UNITS_US.get(row.get("Metric Unit", "nsecond"))
        if scale is None:
            raise ValueError(f"unknown time unit {row.get('Metric Unit')!r}")
        count[name] += 1
        total[name] += float(row["Metric Value"].replace(",", "")) * scale
    return {k: (count[k], total[k]) for k in total}


def table(times: dict[str, tuple[int, float]], title: str = "") -> str:
    whole = sum(t for _, t in times.values())
    lines = [title] if title else []
    lines.append(f"{'kernel':60s} {'count':>6s} {'total_us':>12s} {'%':>6s}")
    for name, (n, t) in sorted(times.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{name:60s} {n:6d} {t:12.1f} {100 * t / whole if whole else 0.0:6.1f}")
    lines.append(f"{'total':60s} {sum(n for n, _ in times.values()):6d} {whole:12.1f}")
    return "\n".join(lines)


PIPE_METRICS = {"us": "gpu__time_duration.sum",
                "tensor %": "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
                "SM %": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
                "L2 %": "lts__throughput.avg.pct_of_peak_sustained_elapsed"}
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")


def pipe_launches(text: str) -> list[dict]:
    """One dict a profiled launch of ncu's plain output: kernel (its name up to the first "(" or space), grid and
    block ("(x, y, z)x(t, 1, 1)"), and each metric's value (a float, None where ncu says n/a), in launch order."""
    launches, cur = [], None
    for line in text.splitlines():
        m = re.match(r"^  (?:void )?(\S+?)(?:\(.*?\))? (\(\d+, \d+, \d+\)x\(\d+, \d+, \d+\)), Context", line)
        if m:
            cur = {"kernel": m.group(1), "launch": m.group(2), "metrics": {}}
            launches.append(cur)
            continue
        m = re.match(r"^\s{4}([a-z]\w*__[\w.]+)\s+(?:\S+\s+)?(\(!\) n/a|[\d.,]+)\s*$", line)
        if cur is not None and m:
            v = m.group(2)
            cur["metrics"][m.group(1)] = None if "n/a" in v else float(v.replace(",", ""))
    return launches


def pipe_table(launches: list[dict], title: str = "", stalls: int = 5) -> str:
    """Markdown: a launch a row, PIPE_METRICS' columns and its `stalls` largest stall reasons (warps stalled per
    issued instruction)."""
    lines = [title, ""] if title else []
    lines += ["| kernel | launch | " + " | ".join(PIPE_METRICS) + " | largest stalls (warps per issue) |",
              "|---|---|" + "---:|" * len(PIPE_METRICS) + "---|"]
    for r in launches:
        vals = [r["metrics"].get(k) for k in PIPE_METRICS.values()]
        cells = ["n/a" if v is None else f"{v:.1f}" for v in vals]
        st = sorted(((v, STALL.match(k).group(1)) for k, v in r["metrics"].items() if STALL.match(k) and v),
                    reverse=True)[:stalls]
        lines.append(f"| {r['kernel']} | {r['launch']} | " + " | ".join(cells) + " | "
                     + ", ".join(f"{name} {v:.2f}" for v, name in st) + " |")
    return "\n".join(lines)


def source_kernels(text: str) -> dict[str, list[dict]]:
    """{kernel name: its SASS rows (ncu's CSV columns)} from ncu's --page source --csv output; ncu prints a
    kernel's block once per profiled launch, and a name seen again keeps its first block."""
    kernels = {}
    for block in re.split(r'^"Kernel Name",', text, flags=re.M)[1:]:
        head, _, body = block.partition("\n")
        name = next(csv.reader([head]))[0]
        if name not in kernels:
            kernels[name] = list(csv.DictReader(io.StringIO(body)))
    return kernels


SAMPLES = "Warp Stall Sampling (All Samples)"


def _stalls(row: dict, n: int) -> str:
    st = [(int(v or 0), k[6:]) for k, v in row.items() if k.startswith("stall_") and "Not Issued" not in k]
    return ", ".join(f"{k} {v}" for v, k in sorted(st, reverse=True)[:n] if v)


def source_table(kernels: dict[str, list[dict]], title: str = "", opcodes: int = 12, hot: int = 8) -> str:
    """Per kernel: its `opcodes` opcodes with the most samples and the `hot` instructions with the most, with the
    share of the kernel's samples and the largest stall reasons (samples)."""
    lines = [title, ""] if title else []
    for name, rows in kernels.items():
        total = sum(int(r[SAMPLES] or 0) for r in rows) or 1
        by_op: dict[str, dict] = {}
        for r in rows:
            op = re.sub(r"^@!?U?P\w+\s+", "", r["Source"].strip()).split(" ")[0].split(".")[0]
            acc = by_op.setdefault(op, defaultdict(int))
            for k, v in r.items():
                if k == SAMPLES or (k.startswith("stall_") and "Not Issued" not in k):
                    acc[k] += int(v or 0)
        lines += [f"## {name}: {total} samples, {len(rows)} instructions", "",
                  "| opcode | samples | % | largest stalls |", "|---|---:|---:|---|"]
        for op, acc in sorted(by_op.items(), key=lambda kv: -kv[1][SAMPLES])[:opcodes]:
            lines.append(f"| {op} | {acc[SAMPLES]} | {100 * acc[SAMPLES] / total:.1f} | {_stalls(acc, 4)} |")
        lines += ["", "| instruction | executed | samples | % | largest stalls |", "|---|---:|---:|---:|---|"]
        for r in sorted(rows, key=lambda r: -int(r[SAMPLES] or 0))[:hot]:
            n = int(r[SAMPLES] or 0)
            lines.append(f"| `{r['Source'].strip()}` | {r.get('Instructions Executed', '')} | {n} | "
                         f"{100 * n / total:.1f} | {_stalls(r, 3)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", help="ncu --csv output (- for stdin); with --pipe its plain output")
    ap.add_argument("--title", default="", help="the table's first line (card, model, batch, precision, commit)")
    ap.add_argument("--pipe", action="store_true", help="a launch a row: tensor pipe, throughputs, stall reasons")
    ap.add_argument("--source", action="store_true", help="per kernel: warp samples by opcode and instruction")
    args = ap.parse_args(argv)
    text = sys.stdin.read() if args.csv == "-" else open(args.csv, errors="replace").read()
    if args.source:
        print(source_table(source_kernels(text), args.title))
    else:
        print(pipe_table(pipe_launches(text), args.title) if args.pipe else table(kernel_times(text), args.title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
