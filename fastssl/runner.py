"""``fastssl train METHOD`` and ``fastssl train --all``: the methods of :mod:`fastssl.models` run by name on
the harness of :mod:`fastssl.training`, and the summary of a whole run (``summary.json``, ``table.md``,
the README's results table between the train-table markers).

>>> replace_table(f"a\\n{TABLE_BEGIN}\\nold\\n{TABLE_END}\\nb", "new").split("\\n")[1:4]
['<!-- train-table:begin -->', 'new', '<!-- train-table:end -->']
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch

from .models import load_method
from .training import TrainConfig, write_json, write_outputs

TABLE_BEGIN, TABLE_END = "<!-- train-table:begin -->", "<!-- train-table:end -->"


def run(method: str, config: TrainConfig) -> dict:
    """Train ``method`` (a name from ``fastssl.models.METHODS``) and write its outputs."""
    torch.manual_seed(config.seed)
    start, cpu_start = time.time(), time.process_time()
    result = load_method(method).train(config)  # result.method: the method, or its variant ("clip-sigmoid")
    return write_outputs(result, os.path.join(config.out, result.method), time.time() - start,
                         time.process_time() - cpu_start)


def run_all(methods, config: TrainConfig, readme: Optional[str] = None) -> list:
    """Train each method in turn, write ``summary.json`` and ``table.md`` to ``config.out`` and, with
    ``readme``, replace that file's train-table block with the table."""
    rows = [run(name, config) for name in methods]
    table = results_table(rows)
    os.makedirs(config.out, exist_ok=True)
    write_json(os.path.join(config.out, "summary.json"),
               {"quick": config.quick, "seed": config.seed, "device": config.device, "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"), "rows": rows})
    with open(os.path.join(config.out, "table.md"), "w") as f:
        f.write(table + "\n")
    if readme:
        with open(readme) as f:
            text = replace_table(f.read(), table)
        with open(readme, "w") as f:
            f.write(text)
    return rows


def results_table(rows: list) -> str:
    """A markdown table of ``metrics.json`` dicts: method | metric | value | baseline | beats it | wall and
    CPU seconds (user + system, all threads: on 2 idle cores wall is about half of it)."""
    lines = ["| method | metric | value | baseline | beats baseline | wall s | CPU s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        arrow = "higher" if r["higher_is_better"] else "lower"
        lines.append(f"| {r['method']} | {r['metric']} ({arrow} is better) | {r['value']:.3f} | {r['baseline']:.3f} | "
                     f"{'yes' if r['beats_baseline'] else '**no**'} | {r['seconds']:.0f} | {r.get('cpu_seconds') or 0:.0f} |")
    return "\n".join(lines)


def replace_table(text: str, table: str) -> str:
    """``text`` with the part between the train-table markers replaced by ``table``."""
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise ValueError(f"no {TABLE_BEGIN} ... {TABLE_END} block to replace")
    head, rest = text.split(TABLE_BEGIN, 1)
    return f"{head}{TABLE_BEGIN}\n{table}\n{TABLE_END}{rest.split(TABLE_END, 1)[1]}"
