"""Render the Grafana dashboard's panels from a live Prometheus, as a PNG (matplotlib): the
dashboard as its queries see the stack, where no Grafana can run.

    .venv/bin/python ops/grafana/render_panels.py --prometheus http://localhost:9090 \
        --minutes 10 --out docs/dashboard.png
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DASHBOARD = Path(__file__).resolve().parent / "dashboard.json"


def query_range(prometheus: str, expr: str, start: float, end: float, step: int) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as r:
        return json.load(r)["data"]["result"]


def concrete(expr: str) -> str:
    """The dashboard's variables as "All" and a 1-minute rate window."""
    return (
        expr.replace('=~"$task"', '=~".*"')
        .replace('=~"$adapter"', '=~".*"')
        .replace("$__rate_interval", "1m")
    )


def legend(template: str, labels: dict[str, str]) -> str:
    # A label Prometheus dropped (an empty version) renders empty, as in Grafana.
    return re.sub(r"\{\{(\w+)\}\}", lambda m: labels.get(m.group(1), ""), template).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://localhost:9090")
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    args = parser.parse_args()
    panels = json.loads(DASHBOARD.read_text())["panels"]
    end = time.time()
    start = end - args.minutes * 60
    columns = 2
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(16, 3.6 * rows))
    for axis, panel in zip(axes.flat, panels, strict=False):
        for target in panel["targets"]:
            for series in query_range(args.prometheus, concrete(target["expr"]), start, end, 15):
                points = [(float(t) - end, float(v)) for t, v in series["values"]]
                points = [(t / 60, v) for t, v in points if math.isfinite(v)]
                if points:
                    xs, ys = zip(*points, strict=True)
                    axis.plot(xs, ys, label=legend(target["legendFormat"], series["metric"]))
        axis.set_title(panel["title"], fontsize=10)
        axis.set_xlabel("minutes ago", fontsize=8)
        axis.tick_params(labelsize=8)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="upper left")
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.suptitle("lora-workers dashboard, rendered from Prometheus (ops/grafana/dashboard.json)")
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
