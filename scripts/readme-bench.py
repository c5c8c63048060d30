"""Copy the benchmark tables from results/*.md into README.md between their markers."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = {"core": "bench_core.md", "vmap": "vmap_scaling.md", "latency": "bench_latency.md",
          "compare": "compare.md", "dataplane": "bench_dataplane.md"}

readme = (ROOT / "README.md").read_text()
for key, name in TABLES.items():
    path = ROOT / "results" / name
    if not path.exists():
        continue
    table = "\n".join(line for line in path.read_text().splitlines() if line.startswith("|"))
    readme = re.sub(rf"(<!-- bench:{key} -->\n).*?(<!-- /bench:{key} -->)",
                    lambda m: m.group(1) + table + "\n" + m.group(2), readme, flags=re.S)
(ROOT / "README.md").write_text(readme)
