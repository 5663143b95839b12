#!/usr/bin/env python3
"""Writes one scenario's section of BENCHMARKS.md from scripts/bench.sh's rows.

    report.py SCENARIO DIR OUT

DIR holds results.tsv, requests.tsv, sizes.tsv and meta.tsv (see
scripts/bench/scenarios.sh). The section sits between
`<!-- bench:SCENARIO begin -->` and `<!-- bench:SCENARIO end -->` below the
marker that scripts/bench.sh keeps when it rewrites the `mixed` report; a
section already there is replaced, others are left alone. Numbers are medians
over rounds; ratios are custos / peer (below 1: custos is faster).
"""

import csv
import os
import statistics
import sys

KEPT = "<!-- kept by scripts/bench.sh: notes and other runs below -->"
MIB = 1024.0


def load(path):
    if not os.path.exists(path):
        return []
    return list(csv.DictReader(open(path), delimiter="\t"))


class Rows:
    def __init__(self, rows):
        self.rows = rows

    def values(self, case, tool, phase, field):
        return [float(r[field]) for r in self.rows
                if r["case"] == case and r["tool"] == tool and r["phase"] == phase]

    def med(self, case, tool, phase, field="wall_s"):
        v = self.values(case, tool, phase, field)
        return statistics.median(v) if v else None

    def cases(self):
        out = []
        for r in self.rows:
            if r["case"] not in out:
                out.append(r["case"])
        return out

    def tools(self, case=None):
        out = []
        for r in self.rows:
            if (case is None or r["case"] == case) and r["tool"] not in out:
                out.append(r["tool"])
        return out


def secs(v):
    return "" if v is None else f"{v:.2f} s"


def mib(kib):
    return "" if kib is None else f"{kib / MIB:.0f} MiB"


def ratio(a, b, fmt="{:.2f}"):
    return fmt.format(a / b) if a is not None and b else ""


def verdict(value, ok):
    if value is None:
        return "not measured"
    return "met" if ok(value) else "**missed**"


def header(meta, title, what):
    L = [f"## Scenario `{title}`: {what}\n"]
    L.append(f"Measured {meta.get('date', '?')} by `{meta.get('command', '?')}`; "
             f"tools: {meta.get('tools', '?')}. "
             + ", ".join(f"{k[8:]}: {v}" for k, v in meta.items() if k.startswith("version_")) + ".\n")
    for k, v in meta.items():
        if k.startswith("dataset"):
            label = "Dataset" if k == "dataset" else f"Dataset ({k[8:]})"
            L.append(f"{label}: {v}.\n")
    if meta.get("note"):
        L.append(f"Note: {meta['note']}.\n")
    L.append("Machine load (shared with other engineers' compiles): "
             f"before `{meta.get('uptime_before', '?').strip()}`, "
             f"after `{meta.get('uptime_after', '?').strip()}`.\n")
    return L


def phase_table(L, R, case, phases, peers, floor=None):
    tools = ["custos"] + peers + ([floor] if floor else [])
    L.append("| phase | " + " | ".join(t.replace("|", "\\|") for t in tools) + " | "
             + " | ".join(f"custos / {p.replace('|', chr(92) + '|')}" for p in peers + ([floor] if floor else [])) + " |")
    L.append("|---|" + "---|" * (2 * len(tools) - 1))
    for ph in phases:
        cells = []
        for t in tools:
            w, rss = R.med(case, t, ph), R.med(case, t, ph, "maxrss_kib")
            cells.append(f"{secs(w)}, {mib(rss)}" if w is not None else "")
        rs = [ratio(R.med(case, "custos", ph), R.med(case, p, ph)) for p in peers + ([floor] if floor else [])]
        L.append(f"| {ph} | " + " | ".join(cells) + " | " + " | ".join(rs) + " |")
    L.append("")


def sizes_line(L, sizes, case):
    s = {r["tool"]: int(r["repo_bytes"]) for r in sizes if r["case"] == case and int(r["repo_bytes"]) > 0}
    if s:
        L.append("Repository size: " + ", ".join(f"{t} {v / 2**20:.0f} MiB" for t, v in s.items()) + ".\n")


def targets(L, items):
    L.append("| target | measured | |")
    L.append("|---|---|---|")
    for what, shown, ok in items:
        L.append(f"| {what} | {shown} | {ok} |")
    L.append("")


def small(R, sizes, meta):
    L = header(meta, "small", "many small files")
    case = R.cases()[0]
    peers = [t for t in R.tools(case) if t not in ("custos", "tar|zstd")]
    floor = "tar|zstd" if "tar|zstd" in R.tools(case) else None
    L.append("Wall time and peak RSS (medians of rounds); `tar|zstd` is "
             "`tar -c | zstd -3 -T2` into a file for the backup and `zstd -d | tar -x` "
             "for the restore (the floor for creating that many files).\n")
    phase_table(L, R, case, ["first", "incremental", "restore", "check"], peers, floor)
    sizes_line(L, sizes, case)
    c = lambda ph: R.med(case, "custos", ph)
    items = []
    if "restic" in peers:
        for ph, name in (("first", "first backup"), ("restore", "full restore")):
            v = c(ph) / R.med(case, "restic", ph) if c(ph) and R.med(case, "restic", ph) else None
            items.append((f"{name} / restic ≤ 0.5", "" if v is None else f"{v:.2f}", verdict(v, lambda x: x <= 0.5)))
    if floor:
        for ph, name in (("first", "first backup / `tar -c \\| zstd -3 -T2`"), ("restore", "restore / `zstd -d \\| tar -x`")):
            v = c(ph) / R.med(case, floor, ph) if c(ph) and R.med(case, floor, ph) else None
            items.append((f"{name} ≤ 1.5", "" if v is None else f"{v:.2f}", verdict(v, lambda x: x <= 1.5)))
    targets(L, items)
    return L


def many(R, sizes, meta):
    L = header(meta, "many", "millions of files")
    cases = R.cases()
    peers = [t for t in R.tools() if t not in ("custos", "tar|zstd")]
    for case in cases:
        L.append(f"**{int(case):,} files**: wall time and peak RSS.\n")
        phase_table(L, R, case, ["first", "incremental", "restore", "check"], peers)
        sizes_line(L, sizes, case)
    items = []
    last = cases[-1]
    if "restic" in peers:
        v = R.med(last, "custos", "incremental")
        p = R.med(last, "restic", "incremental")
        r = v / p if v and p else None
        items.append((f"incremental (one file changed) / restic ≤ 0.2 at {int(last):,} files",
                      "" if r is None else f"{r:.2f}", verdict(r, lambda x: x <= 0.2)))
    for ph in ("first", "restore", "check"):
        v = R.med(last, "custos", ph, "maxrss_kib")
        items.append((f"custos peak RSS, {ph}, ≤ 200 MiB at {int(last):,} files", mib(v),
                      verdict(None if v is None else v / MIB, lambda x: x <= 200)))
    if len(cases) > 1:
        a, b = cases[0], cases[-1]
        L.append(f"Peak RSS growth from {int(a):,} to {int(b):,} files:\n")
        L.append("| tool | phase | " + f"{int(a):,} | {int(b):,} | growth |")
        L.append("|---|---|---|---|---|")
        for t in ["custos"] + peers:
            for ph in ("first", "incremental", "restore", "check"):
                x, y = R.med(a, t, ph, "maxrss_kib"), R.med(b, t, ph, "maxrss_kib")
                if x and y:
                    L.append(f"| {t} | {ph} | {mib(x)} | {mib(y)} | {100 * (y - x) / x:+.0f}% |")
        L.append("")
        for ph in ("first", "restore", "check"):
            x, y = R.med(a, "custos", ph, "maxrss_kib"), R.med(b, "custos", ph, "maxrss_kib")
            g = 100 * (y - x) / x if x and y else None
            items.append((f"custos peak RSS growth, {ph}, < 25%", "" if g is None else f"{g:+.0f}%",
                          verdict(g, lambda v: v < 25)))
    targets(L, items)
    return L


def s3(R, sizes, meta, requests):
    L = header(meta, "s3", "S3 on loopback")
    peers = [t for t in R.tools() if t != "custos"]
    size = None
    ds = meta.get("dataset", "")
    for word in ds.replace(",", " ").split():
        if word.isdigit():
            size = int(word)
            break
    for case in R.cases():
        L.append(f"**{case}**: wall time and peak RSS.\n")
        phase_table(L, R, case, ["first", "incremental", "unchanged", "restore", "check"], peers)
    if requests:
        gib = (size or 2**30) / 2**30
        L.append(f"HTTP requests per phase, counted at the proxy (per GiB: divided by the "
                 f"dataset's {gib:.2f} GiB; bodies in MiB, up / down):\n")
        tools = []
        for r in requests:
            if r["tool"] not in tools:
                tools.append(r["tool"])
        L.append("| phase | " + " | ".join(f"{t} requests | {t} per GiB | {t} MiB up / down" for t in tools) + " |")
        L.append("|---|" + "---|" * (3 * len(tools)))
        for ph in ("first", "incremental", "unchanged", "restore", "check"):
            cells = []
            for t in tools:
                v = [r for r in requests if r["tool"] == t and r["phase"] == ph]
                if not v:
                    cells += ["", "", ""]
                    continue
                n = statistics.median(int(r["requests"]) for r in v)
                up = statistics.median(int(r["bytes_up"]) for r in v) / 2**20
                down = statistics.median(int(r["bytes_down"]) for r in v) / 2**20
                cells += [f"{n:.0f}", f"{n / gib:.0f}", f"{up:.0f} / {down:.0f}"]
            L.append(f"| {ph} | " + " | ".join(cells) + " |")
        L.append("")
    items = []
    if "restic" in peers:
        for case in R.cases():
            for ph, name in (("first", "backup"), ("restore", "restore")):
                a, b = R.med(case, "custos", ph), R.med(case, "restic", ph)
                v = a / b if a and b else None
                items.append((f"{case}: {name} / restic ≤ 0.5", "" if v is None else f"{v:.2f}",
                              verdict(v, lambda x: x <= 0.5)))
    targets(L, items)
    return L


def tenants(R, sizes, meta):
    L = header(meta, "tenants", "one daemon, many tenants")
    single = R.values("single", "custos", "backup", "wall_s")
    dcase = [c for c in R.cases() if c.startswith("daemon")]
    d = [r for r in R.rows if dcase and r["case"] == dcase[0]]
    n = None
    if d:
        n = int(d[0]["phase"].split()[1])
    L.append(f"`max_concurrent_jobs = {meta.get('max_concurrent_jobs', '?')}`. "
             f"Daemon jobs: {meta.get('daemon_jobs', '?')}; job durations (ms): {meta.get('daemon_job_ms', '?')}; "
             f"median job duration (ms) per tenth of the jobs in start order: {meta.get('daemon_job_ms_by_tenth', '?')}.\n")
    L.append("| what | wall | peak RSS |")
    L.append("|---|---|---|")
    if single:
        rss = [float(r["maxrss_kib"]) for r in R.rows if r["case"] == "single"]
        L.append(f"| one first backup of one tenant (`custos backup`), median of {len(single)} | "
                 f"{statistics.median(single):.3f} s | {mib(max(rss))} |")
    per = None
    if d:
        wall, rss = float(d[0]["wall_s"]), float(d[0]["maxrss_kib"])
        per = wall / n
        L.append(f"| `daemon --once`, {n} tenants | {wall:.1f} s | {mib(rss)} |")
        L.append(f"| per tenant (wall / {n}) | {per:.3f} s | |")
        cpu = float(d[0]["user_s"]) + float(d[0]["sys_s"])
        L.append(f"| CPU per tenant, (user + sys) / {n} | {cpu / n:.3f} s | |")
    L.append("")
    r = per / statistics.median(single) if per and single else None
    targets(L, [("time per tenant / one single small backup ≤ 3", "" if r is None else f"{r:.2f}",
                 verdict(r, lambda x: x <= 3))])
    return L


def main():
    scenario, d, out = sys.argv[1:]
    R = Rows(load(os.path.join(d, "results.tsv")))
    sizes = load(os.path.join(d, "sizes.tsv"))
    requests = load(os.path.join(d, "requests.tsv"))
    meta = {}
    for line in open(os.path.join(d, "meta.tsv")):
        if "\t" in line:
            k, v = line.rstrip("\n").split("\t", 1)
            meta[k] = v
    if not R.rows:
        sys.exit(f"report.py: no rows in {d}/results.tsv")
    build = {"small": small, "many": many, "tenants": tenants}
    if scenario == "s3":
        L = s3(R, sizes, meta, requests)
    elif scenario in build:
        L = build[scenario](R, sizes, meta)
    else:
        sys.exit(f"report.py: unknown scenario {scenario}")
    L.append(f"Raw rows: `{scenario}/results.tsv` in the bench directory.\n")
    begin, end = f"<!-- bench:{scenario} begin -->", f"<!-- bench:{scenario} end -->"
    section = begin + "\n\n" + "\n".join(L) + "\n" + end + "\n"
    try:
        text = open(out).read()
    except FileNotFoundError:
        text = "# Benchmarks\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        if KEPT not in text:
            text = text.rstrip("\n") + "\n" + KEPT + "\n"
        text = text.rstrip("\n") + "\n\n" + section
    open(out, "w").write(text)
    print(f"wrote the {scenario} section of {out}")


if __name__ == "__main__":
    main()
