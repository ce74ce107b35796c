"""Prints the group_norm A/B of this folder: the fused op's fastest time per case over the two runs
of each build (gn-{new,old}-run{1,2}.json) and old/new."""

import json
import pathlib

HERE = pathlib.Path(__file__).parent
rows = {}
for build in ("new", "old"):
    for run in (1, 2):
        for r in json.loads((HERE / f"gn-{build}-run{run}.json").read_text())["records"]:
            if "fused" in r["impl"]:
                key = (r["dtype"], r["op"].split()[-1], r["impl"].split()[-1], "x".join(map(str, r["shape"])))
                rows.setdefault(key, {}).setdefault(build, []).append(r["ms"])
print("| dtype | pass | layout | shape | before ms | after ms | before / after |")
print("|---|---|---|---|---|---|---|")
for (dtype, pas, layout, shape), v in rows.items():
    old, new = min(v["old"]), min(v["new"])
    print(f"| {dtype} | {pas} | {layout} | {shape} | {old:.4f} | {new:.4f} | {old / new:.2f} |")
