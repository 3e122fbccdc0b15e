"""The README's results table, generated from the committed results JSON (never typed by hand).

`hetnet bench --readme` prints it; `hetnet bench --readme --write` replaces the block between the README's
`<!-- results -->` and `<!-- /results -->` markers. tests/test_bench.py checks that the committed README holds exactly
what the committed JSON gives, so a number cannot drift from its source.

Rows: the GPU training step against PyTorch's CUDA graph (benchmarks/results/NVIDIA-H200/train_step.json, and
cifar-wide's row per precision from the newest precision table of any card that measured it, naming the card,
NVIDIA-<card>/precision_step*.json), the CPU step against PyTorch CPU (benchmarks/results/vm/
train_step.json), and learning quality: `make run`'s Fashion-MNIST job (fashion-cnn-main-job/metrics.jsonl) and the
CIFAR-10 speed run beside airbench94 (cifar_speedrun.json) when present.
"""
from __future__ import annotations

import json
from pathlib import Path

BEGIN, END = "<!-- results -->", "<!-- /results -->"
GPU_DIR, CPU_DIR = "NVIDIA-H200", "vm"
GPU_ROWS = (("thesis-m1", 32), ("thesis-m1", 1024), ("fashion-cnn", 32), ("fashion-cnn", 1024))
CPU_ROWS = (("thesis-m1", 32), ("thesis-m1", 128), ("fashion-cnn", 128))
PRECISION_ORDER = ("fp32", "tf32", "bf16")


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _row(doc, model: str, batch: int, **match):
    for r in (doc or {}).get("rows", []):
        if r.get("model") == model and r.get("batch_size") == batch and r.get("status") == "ok" \
                and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _date(doc) -> str:
    return (doc or {}).get("environment", {}).get("time_utc", "")[:10]


def _precision_rows(results: Path) -> tuple[list, list]:
    """cifar-wide's batch-512 rows of the precision tables, one per precision in PRECISION_ORDER, as (card, row): each
    from the newest of every card's precision_step.json and its dated predecessors (results/NVIDIA-<card>/
    precision_step_<commit or date>.json) that has it (a run may measure one precision only; the ratio is always
    PyTorch's in the same run on the same card); and the sources used, as "folder/file (date)"."""
    docs = [(f"{p.parent.name}/{p.name}", _load(p)) for p in sorted(results.glob("NVIDIA-*/precision_step*.json"))]
    docs.sort(key=lambda nd: nd[1].get("environment", {}).get("time_utc", ""), reverse=True)
    rows, used = [], []
    for precision in PRECISION_ORDER:
        for name, doc in docs:
            r = _row(doc, "cifar-wide", 512, precision=precision)
            if r and r.get("hetnet_img_per_s") and r.get("torch_graph_img_per_s"):
                rows.append((name.split("/")[0].removeprefix("NVIDIA-"), r))
                if name not in used:
                    used.append(name)
                break
    return rows, [f"{name} ({_date(dict(docs)[name])})" for name in used]


def results_table(results: Path) -> str:
    """The markdown table (with a line naming its sources) from the results folder `results`."""
    lines = ["| measure | hetnet | peer | hetnet / peer |", "|---|---:|---:|---:|"]
    gpu = _load(results / GPU_DIR / "train_step.json")
    for model, batch in GPU_ROWS:
        r = _row(gpu, model, batch)
        if r and r.get("torch_graph_ms_per_step"):
            lines.append(f"| GPU training step, {model}, batch {batch} (ms) | {r['hetnet_ms_per_step']:.3f} | "
                         f"{r['torch_graph_ms_per_step']:.3f} PyTorch CUDA graph | "
                         f"{r['torch_graph_ms_per_step'] / r['hetnet_ms_per_step']:.2f}x faster |")
    prec_rows, prec_sources = _precision_rows(results)
    for card, r in prec_rows:
        lines.append(f"| GPU training, cifar-wide, batch 512, {r['precision']}, {card} (images/s) | "
                     f"{r['hetnet_img_per_s']:,.0f} | {r['torch_graph_img_per_s']:,.0f} PyTorch CUDA graph | "
                     f"{r['hetnet_img_per_s'] / r['torch_graph_img_per_s']:.2f}x |")
    cpu = _load(results / CPU_DIR / "train_step.json")
    for model, batch in CPU_ROWS:
        r = _row(cpu, model, batch)
        if r and r.get("torch_eager_ms_per_step"):
            lines.append(f"| CPU training step (2 cores), {model}, batch {batch} (ms) | "
                         f"{r['hetnet_ms_per_step']:.2f} | {r['torch_eager_ms_per_step']:.2f} PyTorch CPU | "
                         f"{r['torch_eager_ms_per_step'] / r['hetnet_ms_per_step']:.2f}x faster |")
    job = results / CPU_DIR / "fashion-cnn-main-job" / "metrics.jsonl"
    if job.exists():
        recs = [json.loads(line) for line in job.read_text().splitlines() if line.strip()]
        last = recs[-1]
        minutes = sum(r.get("seconds", 0) for r in recs) / 60
        lines.append(f"| `make run`: fashion-cnn on Fashion-MNIST, 2 CPU cores, {last['epoch']} epochs | "
                     f"{100 * last['test_accuracy']:.2f}% test accuracy in {minutes:.1f} min | | |")
    speed = _load(results / GPU_DIR / "cifar_speedrun.json")
    if speed and speed.get("hetnet") and speed.get("airbench94"):
        h, a = speed["hetnet"], speed["airbench94"]
        precision = speed.get("hetnet_recipe", {}).get("precision", "fp32")
        lines.append(f"| CIFAR-10 speed run, cifar-speed preset ({precision}), JPEG set, 5,000 held out, "
                     f"{len(h['runs'])} runs each | {100 * h['accuracy_mean']:.2f}% in {h['seconds_mean']:.2f} s | "
                     f"{100 * a['accuracy_mean']:.2f}% in {a['seconds_mean']:.2f} s airbench94 | "
                     f"{h['seconds_mean'] / a['seconds_mean']:.1f}x the time |")
    sources = [f"{GPU_DIR}/train_step.json ({_date(gpu)})" if gpu else None, *prec_sources,
               f"{CPU_DIR}/train_step.json ({_date(cpu)})" if cpu else None,
               f"{CPU_DIR}/fashion-cnn-main-job/" if job.exists() else None,
               f"{GPU_DIR}/cifar_speedrun.json ({_date(speed)})" if speed else None]
    lines.append("")
    lines.append("Sources, in `benchmarks/results/`: " + "; ".join(s for s in sources if s) + ".")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, table: str) -> bool:
    """Replace the block between the markers with `table`; True if the file changed. ValueError if the markers are
    missing."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{table}{END}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text


def readme_block(readme: Path) -> str:
    """What the README holds between the markers now."""
    text = readme.read_text()
    return text.split(BEGIN, 1)[1].split(END, 1)[0].lstrip("\n")
