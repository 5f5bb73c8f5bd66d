#!/usr/bin/env python3
"""Helper for bench/run.sh (standard library only).

Subcommands:
  rss     NAME=PID...            one-shot VmRSS of each process -> JSON on stdout
  rssmon  --out FILE [--stdout FILE] NAME=PID... -- CMD...
                                 run CMD (the load generator) while sampling VmRSS
                                 and CPU time of the processes every 100 ms; write
                                 max RSS and CPU use per process as JSON
  oha     FILE                   print the key numbers of one oha JSON result
  wrk     FILE                   print the key numbers of one wrk text result
  render  --work DIR --out FILE  write the RESULTS.md table from DIR/results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import signal
import statistics
import sys
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# /proc sampling


def read_rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def read_cpu_ticks(pid: int) -> int | None:
    """utime + stime of the whole process (all threads), in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may contain spaces; the fields after the last ')' are fixed.
    rest = data[data.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state); utime is field 14, stime field 15.
    return int(rest[11]) + int(rest[12])


def parse_procs(items: list[str]) -> dict[str, int]:
    procs = {}
    for item in items:
        name, _, pid = item.partition("=")
        if not pid.isdigit():
            sys.exit(f"report.py: bad process spec {item!r}, want NAME=PID")
        procs[name] = int(pid)
    return procs


def cmd_rss(args: argparse.Namespace) -> None:
    procs = parse_procs(args.procs)
    out = {name: {"pid": pid, "rss_kb": read_rss_kb(pid)} for name, pid in procs.items()}
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


def cmd_rssmon(args: argparse.Namespace) -> None:
    """Run args.command (the load generator) and sample the processes while it runs.

    Exits with the command's exit status. Sampling in this one process (no fork
    per sample) keeps the monitor's own CPU use negligible next to the load.
    """
    import subprocess

    procs = parse_procs(args.procs)
    stdout = open(args.stdout, "wb") if args.stdout else None
    t0 = time.monotonic()
    cpu0 = {n: read_cpu_ticks(p) for n, p in procs.items()}
    max_rss = {n: 0 for n in procs}
    samples = 0
    child = subprocess.Popen(args.command, stdout=stdout)

    received: list[int] = []

    def on_signal(signo, _frame):
        received.append(signo)
        child.send_signal(signo)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    while True:
        for n, p in procs.items():
            rss = read_rss_kb(p)
            if rss is not None and rss > max_rss[n]:
                max_rss[n] = rss
        samples += 1
        try:
            child.wait(timeout=args.interval)
            break
        except subprocess.TimeoutExpired:
            pass
    wall = time.monotonic() - t0
    out = {}
    for n, p in procs.items():
        c0, c1 = cpu0[n], read_cpu_ticks(p)
        cpu_s = (c1 - c0) / CLK_TCK if c0 is not None and c1 is not None else None
        out[n] = {
            "pid": p,
            "max_rss_kb": max_rss[n] or None,
            "cpu_s": cpu_s,
            "wall_s": wall,
            "samples": samples,
        }
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    if received:  # die of the same signal so the calling shell sees the interrupt
        signal.signal(received[0], signal.SIG_DFL)
        os.kill(os.getpid(), received[0])
    sys.exit(child.returncode if child.returncode >= 0 else 128 - child.returncode)


# --------------------------------------------------------------------------
# load generator output


def parse_oha(path: Path) -> dict:
    d = json.loads(path.read_text())
    pct = d.get("latencyPercentiles") or {}
    summary = d.get("summary") or {}
    codes = {str(k): int(v) for k, v in (d.get("statusCodeDistribution") or {}).items()}
    errors = {str(k): int(v) for k, v in (d.get("errorDistribution") or {}).items()}
    # On HTTP/1 oha aborts the requests still in flight when -z runs out; those
    # are an artefact of stopping, not failures of the target.
    real_errors = {k: v for k, v in errors.items() if "deadline" not in k.lower()}

    def ms(key):
        v = pct.get(key)
        return None if v is None else v * 1000.0

    return {
        "p50_ms": ms("p50"),
        "p99_ms": ms("p99"),
        "p999_ms": ms("p99.9"),
        "rps": summary.get("requestsPerSec"),
        "success_rate": summary.get("successRate"),
        "ok": codes.get("200", 0),
        "non_200": sum(v for k, v in codes.items() if k != "200"),
        "errors": sum(real_errors.values()),
        "error_kinds": real_errors,
    }


WRK_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.M)
WRK_TOTAL = re.compile(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m)", re.M)
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
WRK_SOCKERR = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)


def parse_wrk(path: Path) -> dict:
    text = path.read_text()
    m = WRK_RPS.search(text)
    if not m:
        raise ValueError(f"{path}: no 'Requests/sec:' line in wrk output")
    out = {"rps": float(m.group(1)), "requests": None, "non_2xx": 0, "socket_errors": 0}
    m = WRK_TOTAL.search(text)
    if m:
        out["requests"] = int(m.group(1))
    m = WRK_NON2XX.search(text)
    if m:
        out["non_2xx"] = int(m.group(1))
    m = WRK_SOCKERR.search(text)
    if m:
        out["socket_errors"] = sum(int(g) for g in m.groups())
    return out


def cmd_oha(args: argparse.Namespace) -> None:
    r = parse_oha(Path(args.file))
    print(
        f"p50 {fmt_ms(r['p50_ms'])} ms  p99 {fmt_ms(r['p99_ms'])} ms  "
        f"p99.9 {fmt_ms(r['p999_ms'])} ms  {r['rps']:.0f} req/s  "
        f"non-200 {r['non_200']}  errors {r['errors']}"
    )


def cmd_wrk(args: argparse.Namespace) -> None:
    r = parse_wrk(Path(args.file))
    print(
        f"{r['rps']:.0f} req/s  non-2xx {r['non_2xx']}  socket errors {r['socket_errors']}"
    )


# --------------------------------------------------------------------------
# formatting helpers


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_ms(v, signed=False):
    if v is None:
        return "–"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def fmt_rps(v):
    return "–" if v is None else f"{v:,.0f}"


def fmt_mib(kb):
    return "–" if kb is None else f"{kb / 1024:.1f}"


def fmt_ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def md_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# machine description


def machine_info() -> dict:
    info = {}
    try:
        info["nproc"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["nproc"] = os.cpu_count()
    info["cpu"] = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    u = os.uname()
    info["kernel"] = f"{u.sysname} {u.release} {u.machine}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    try:
        osr = dict(
            line.split("=", 1)
            for line in Path("/etc/os-release").read_text().splitlines()
            if "=" in line
        )
        info["os"] = osr.get("PRETTY_NAME", "").strip('"')
    except OSError:
        info["os"] = platform.platform()
    return info


def read_kv(path: Path) -> dict[str, str]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                out[k.strip()] = v.strip()
    return out


# --------------------------------------------------------------------------
# RESULTS.md


LABELS = {
    "direct": "direct (client → nginx)",
    "tandem": "tandem pair, mTLS (client → tandem ⇒ tandem → nginx)",
    "tandem-filters": "tandem pair, a route rule with filters (headers set/added/removed both ways, a path rewrite)",
    "tandem-trace-1pct": "tandem pair making and exporting spans (OTLP/HTTP), 1 % of requests sampled",
    "tandem-trace-100pct": "tandem pair making and exporting spans (OTLP/HTTP), every request sampled",
    "envoy": "envoy pair, mTLS (client → envoy ⇒ envoy → nginx)",
    "haproxy": "haproxy hop (client → haproxy → nginx)",
    "haproxy-pair": "haproxy pair, mTLS (client → haproxy ⇒ haproxy → nginx)",
}


def load_targets(res: Path) -> list[dict]:
    targets = []
    for line in (res / "targets.tsv").read_text().splitlines():
        if not line.strip():
            continue
        name, url, procs = (line.split("\t") + ["", ""])[:3]
        targets.append(
            {"name": name, "url": url, "procs": [p for p in procs.split(",") if p]}
        )
    return targets


def collect(res: Path, target: dict, rounds: int) -> dict:
    name = target["name"]
    tdir = res / name
    per_round = []
    loaded = {p: None for p in target["procs"]}
    peak = {p: None for p in target["procs"]}
    cpu_pct = {p: [] for p in target["procs"]}
    for r in range(1, rounds + 1):
        row = {"round": r}
        f = tdir / f"r{r}-oha.json"
        if f.exists():
            row.update(parse_oha(f))
        f = tdir / f"r{r}-wrk.txt"
        if f.exists():
            w = parse_wrk(f)
            row["max_rps"] = w["rps"]
            row["wrk_non_2xx"] = w["non_2xx"]
            row["wrk_socket_errors"] = w["socket_errors"]
        for kind, acc in (("oha", loaded), ("wrk", peak)):
            f = tdir / f"r{r}-{kind}-rss.json"
            if not f.exists():
                continue
            mon = json.loads(f.read_text())
            for p in target["procs"]:
                m = mon.get(p) or {}
                kb = m.get("max_rss_kb")
                if kb is not None and (acc[p] is None or kb > acc[p]):
                    acc[p] = kb
                if kind == "oha" and m.get("cpu_s") is not None and m.get("wall_s"):
                    cpu_pct[p].append(100.0 * m["cpu_s"] / m["wall_s"])
        per_round.append(row)

    idle_all = {}
    f = res / "idle-rss.json"
    if f.exists():
        idle_all = json.loads(f.read_text())
    idle = {p: (idle_all.get(p) or {}).get("rss_kb") for p in target["procs"]}

    def med(key):
        return median([row.get(key) for row in per_round])

    def total(d):
        vals = list(d.values())
        return sum(vals) if vals and all(v is not None for v in vals) else None

    return {
        "name": name,
        "url": target["url"],
        "procs": target["procs"],
        "rounds": per_round,
        "p50": med("p50_ms"),
        "p99": med("p99_ms"),
        "p999": med("p999_ms"),
        "rate_achieved": med("rps"),
        "max_rps": med("max_rps"),
        "errors": sum((row.get("errors") or 0) + (row.get("non_200") or 0) for row in per_round),
        "wrk_errors": sum(
            (row.get("wrk_non_2xx") or 0) + (row.get("wrk_socket_errors") or 0)
            for row in per_round
        ),
        "idle": idle,
        "loaded": loaded,
        "peak": peak,
        "cpu_pct": {p: median(v) for p, v in cpu_pct.items()},
        "idle_total": total(idle),
        "loaded_total": total(loaded),
        "peak_total": total(peak),
    }


def rss_cell(total_kb, parts: dict) -> str:
    if not parts:
        return "–"
    if len(parts) == 1:
        return fmt_mib(total_kb)
    return f"{fmt_mib(total_kb)} ({' + '.join(fmt_mib(v) for v in parts.values())})"


def cmd_render(args: argparse.Namespace) -> None:
    work = Path(args.work)
    res = work / "results"
    settings = read_kv(res / "settings.env")
    versions = read_kv(res / "versions.env")
    rounds = int(settings.get("ROUNDS", "1"))
    rate = float(settings.get("RATE", "0") or 0)
    targets = load_targets(res)
    data = {t["name"]: collect(res, t, rounds) for t in targets}
    direct = data.get("direct")

    def added(d, key):
        if direct is None or d is direct or d[key] is None or direct[key] is None:
            return None
        return d[key] - direct[key]

    info = machine_info()
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out: list[str] = []
    w = out.append

    w("# Tandem benchmark results")
    w("")
    w(f"Generated by `bash bench/run.sh` on **{now}**. "
      "See `bench/README.md` for what is measured and how to read this file.")
    w("")
    w("## Machine")
    w("")
    w(f"- nproc: {info['nproc']}")
    w(f"- CPU: {info['cpu']}")
    w(f"- Kernel: {info['kernel']}")
    if info.get("os"):
        w(f"- OS: {info['os']}")
    if info.get("mem"):
        w(f"- Memory: {info['mem']}")
    if settings.get("LOADAVG_START"):
        w(f"- Load average at start / end of run: {settings.get('LOADAVG_START')} / "
          f"{settings.get('LOADAVG_END', '?')} (1, 5, 15 min; anything well above 0 "
          "means other work shared the CPUs)")
    w("")
    w("Software:")
    w("")
    for k in ("tandem", "envoy", "haproxy", "nginx", "oha", "wrk"):
        if versions.get(k):
            w(f"- {k}: {versions[k]}")
    w("")
    w("## Settings")
    w("")
    w("| knob | value |")
    w("| --- | --- |")
    for k in ("RATE", "DURATION", "CONNS", "ROUNDS", "WARMUP", "WRK_THREADS",
              "WRK_CONNS", "WRK_DURATION", "SKIP_TANDEM", "SKIP_ENVOY", "SKIP_HAPROXY",
              "TANDEM_PROXY_ARGS", "TANDEM_POLICY"):
        if settings.get(k):
            w(f"| `{k}` | `{settings[k]}` |")
    w("")

    w("## Results")
    w("")
    w(f"Latency at a fixed rate of {settings.get('RATE', '?')} req/s "
      f"(oha, latency-corrected, {settings.get('CONNS', '?')} connections, "
      f"{settings.get('DURATION', '?')} per round); max req/s from wrk "
      f"(`-t{settings.get('WRK_THREADS', '?')} -c{settings.get('WRK_CONNS', '?')} "
      f"-d{settings.get('WRK_DURATION', '?')}`). Latencies and req/s are medians over "
      f"{rounds} round(s); latencies in milliseconds; RSS in MiB (pairs: sum, then each "
      "sidecar as client-side + server-side).")
    w("")
    header = ["path", "p50 ms", "p99 ms", "p99.9 ms", "added p50 ms", "added p99 ms",
              "max req/s", "RSS idle MiB", "RSS loaded MiB"]
    rows = []
    for name in ("direct", "tandem", "tandem-filters", "tandem-trace-1pct", "tandem-trace-100pct",
                 "envoy", "haproxy", "haproxy-pair"):
        d = data.get(name)
        if d is None:
            continue
        rows.append([
            LABELS.get(name, name),
            fmt_ms(d["p50"]), fmt_ms(d["p99"]), fmt_ms(d["p999"]),
            fmt_ms(added(d, "p50"), signed=True), fmt_ms(added(d, "p99"), signed=True),
            fmt_rps(d["max_rps"]),
            rss_cell(d["idle_total"], d["idle"]),
            rss_cell(d["loaded_total"], d["loaded"]),
        ])
    w(md_table(header, rows))
    w("")
    skipped = [LABELS[n] for n in ("tandem", "envoy", "haproxy")
               if settings.get(f"SKIP_{n.upper()}") == "1"]
    if skipped:
        w("Skipped in this run: " + "; ".join(skipped) + ".")
        w("")
    warnings = []
    for d in data.values():
        if rate and d["rate_achieved"] is not None and d["rate_achieved"] < 0.95 * rate:
            warnings.append(f"{d['name']}: oha achieved only {d['rate_achieved']:.0f} req/s "
                            f"of the {rate:.0f} requested (target or load generator saturated)")
        if d["errors"]:
            warnings.append(f"{d['name']}: {d['errors']} failed or non-200 responses "
                            "during the fixed-rate runs")
        if d["wrk_errors"]:
            warnings.append(f"{d['name']}: {d['wrk_errors']} non-2xx responses or socket "
                            "errors during the wrk runs")
    if warnings:
        w("**Warnings:**")
        w("")
        for x in warnings:
            w(f"- {x}")
        w("")

    t, e = data.get("tandem"), data.get("envoy")
    if t and e:
        w("## Tandem vs Envoy")
        w("")
        w("Ratio = tandem / envoy. For latency and RSS lower is better (< 1× means "
          "Tandem is smaller); for max req/s higher is better.")
        w("")
        rows = [
            ["p50 ms", fmt_ms(t["p50"]), fmt_ms(e["p50"]), fmt_ratio(t["p50"], e["p50"])],
            ["p99 ms", fmt_ms(t["p99"]), fmt_ms(e["p99"]), fmt_ratio(t["p99"], e["p99"])],
            ["p99.9 ms", fmt_ms(t["p999"]), fmt_ms(e["p999"]), fmt_ratio(t["p999"], e["p999"])],
            ["added p50 ms", fmt_ms(added(t, "p50"), True), fmt_ms(added(e, "p50"), True),
             fmt_ratio(added(t, "p50"), added(e, "p50"))],
            ["added p99 ms", fmt_ms(added(t, "p99"), True), fmt_ms(added(e, "p99"), True),
             fmt_ratio(added(t, "p99"), added(e, "p99"))],
            ["max req/s", fmt_rps(t["max_rps"]), fmt_rps(e["max_rps"]),
             fmt_ratio(t["max_rps"], e["max_rps"])],
            ["RSS idle MiB (pair)", fmt_mib(t["idle_total"]), fmt_mib(e["idle_total"]),
             fmt_ratio(t["idle_total"], e["idle_total"])],
            ["RSS loaded MiB (pair)", fmt_mib(t["loaded_total"]), fmt_mib(e["loaded_total"]),
             fmt_ratio(t["loaded_total"], e["loaded_total"])],
        ]
        w(md_table(["metric", "tandem", "envoy", "tandem/envoy"], rows))
        w("")

    f = data.get("tandem-filters")
    if t and f:
        w("## Cost of HTTPRoute filters")
        w("")
        w("The same Tandem pair and route, through a rule with filters (request headers "
          "set, added and removed, a response header set and one removed, a prefix "
          "rewrite) and through the rule without any. The target is at most 0.02 ms "
          "at p50.")
        w("")
        rows = [[k, fmt_ms(t[key]), fmt_ms(f[key]), fmt_ms(f[key] - t[key], True)]
                for k, key in (("p50 ms", "p50"), ("p99 ms", "p99"))
                if t[key] is not None and f[key] is not None]
        rows.append(["max req/s", fmt_rps(t["max_rps"]), fmt_rps(f["max_rps"]),
                     fmt_ratio(f["max_rps"], t["max_rps"])])
        w(md_table(["metric", "no filters", "filters", "filters − none"], rows))
        w("")

    traced = [(n, data[n]) for n in ("tandem-trace-1pct", "tandem-trace-100pct") if n in data]
    if t and traced:
        w("## Cost of tracing")
        w("")
        w("Tandem pairs with the same config, one without tracing (`tandem`) and two "
          "that make spans (a server span, a client span and one per try, per request) "
          "and export them over OTLP/HTTP to a local sink (`bench/otlp-sink.py`) with "
          "`--trace-sampler parentbased_traceidratio`, at 1 % and at 100 %. The "
          "requests carry no trace headers, so the sidecars start the traces and the "
          "ratio decides. Difference = traced − untraced.")
        w("")
        header = ["metric", "untraced"]
        for n, _ in traced:
            header += [n.removeprefix("tandem-trace-").replace("pct", " %"), "difference"]
        rows = []
        for k, key in (("p50 ms", "p50"), ("p99 ms", "p99")):
            if t[key] is None:
                continue
            row = [k, fmt_ms(t[key])]
            for _, d in traced:
                row += [fmt_ms(d[key]), fmt_ms(d[key] - t[key], True) if d[key] is not None else "–"]
            rows.append(row)
        row = ["max req/s", fmt_rps(t["max_rps"])]
        for _, d in traced:
            row += [fmt_rps(d["max_rps"]), fmt_ratio(d["max_rps"], t["max_rps"])]
        rows.append(row)
        row = ["RSS loaded MiB (pair)", fmt_mib(t["loaded_total"])]
        for _, d in traced:
            row += [fmt_mib(d["loaded_total"]), fmt_ratio(d["loaded_total"], t["loaded_total"])]
        rows.append(row)
        w(md_table(header, rows))
        w("")
        spans_path = res / "tandem-trace-spans.txt"
        if spans_path.exists() and spans_path.read_text().strip():
            w("Spans counted by the traced sidecars at the end of the run "
              "(`tandem_trace_spans_total`, admin port and result):")
            w("")
            w("```")
            w(spans_path.read_text().strip())
            w("```")
            w("")

    anchors = [(n, data[n]) for n in ("haproxy", "haproxy-pair", "envoy") if n in data]
    if t and anchors:
        w("## Tandem pair against each anchor")
        w("")
        w("Ratio = the Tandem pair's figure / the anchor's, from this run. Added latency "
          "is the path's latency minus the direct path's; lower is better. Max req/s: "
          "higher is better.")
        w("")
        rows = []
        for key, label in (("p50", "added p50"), ("p99", "added p99")):
            rows.append([label] + [fmt_ratio(added(t, key), added(a, key)) for _, a in anchors])
        rows.append(["max req/s"] + [fmt_ratio(t["max_rps"], a["max_rps"]) for _, a in anchors])
        w(md_table(["Tandem pair ÷"] + [LABELS.get(n, n) for n, _ in anchors], rows))
        w("")

    hs_path = res / "handshakes.tsv"
    hs = {}
    if hs_path.exists():
        for line in hs_path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) == 4:
                name, conns, secs, ticks = parts
                hs[name] = (int(conns), int(secs), int(ticks) / CLK_TCK)
    if hs:
        w("## TLS handshakes")
        w("")
        w("Full TLS 1.3 handshakes with a client certificate (ECDSA P-256, no resumption) "
          "against each server-side sidecar, one `openssl s_time -new` client connecting "
          "over and over. The client shares the two cores, so these rates are a floor for "
          "what the sidecar sustains. CPU: the sidecar's CPU time per handshake.")
        w("")
        rows = []
        for name, (conns, secs, cpu) in hs.items():
            rate_hs = conns / secs if secs else None
            rows.append([name, str(conns), str(secs),
                         "–" if rate_hs is None else f"{rate_hs:.0f}",
                         "–" if not conns else f"{cpu / conns * 1e6:.0f} µs"])
        w(md_table(["server-side sidecar", "handshakes", "seconds", "handshakes/s",
                    "sidecar CPU per handshake"], rows))
        w("")
        if "tandem" in hs and "envoy" in hs and hs["envoy"][0]:
            t_rate = hs["tandem"][0] / max(hs["tandem"][1], 1)
            e_rate = hs["envoy"][0] / max(hs["envoy"][1], 1)
            w(f"Handshake rate tandem/envoy: {fmt_ratio(t_rate, e_rate)}.")
            w("")
        metrics = res / "tandem-handshake-metrics.txt"
        if metrics.exists() and metrics.read_text().strip():
            w("Tandem's own count after the run (`tandem_tls_handshakes_total` on the "
              "server-side sidecar; the pair's pooled connections are a handful of these). "
              "`s_time` closes each connection as soon as its own side of the handshake is "
              "done and sends nothing; `io` counts the handshakes that ended with an I/O "
              "error on the sidecar's side:")
            w("")
            w("```")
            w(metrics.read_text().rstrip())
            w("```")
            w("")

    w("## Per proxy process")
    w("")
    w("RSS idle: VmRSS after readiness, before any request went through. RSS loaded: "
      "max VmRSS sampled every 100 ms during the fixed-rate (oha) runs. RSS at max "
      "throughput: the same during the wrk runs. CPU: process CPU time / wall time during "
      "the fixed-rate runs (100% = one core), median over rounds.")
    w("")
    rows = []
    for d in data.values():
        for p in d["procs"]:
            rows.append([
                f"{d['name']}: {p}", fmt_mib(d["idle"].get(p)), fmt_mib(d["loaded"].get(p)),
                fmt_mib(d["peak"].get(p)),
                "–" if d["cpu_pct"].get(p) is None else f"{d['cpu_pct'][p]:.1f}%",
            ])
    if rows:
        w(md_table(["process", "RSS idle MiB", "RSS loaded MiB",
                    "RSS at max throughput MiB", f"CPU at {settings.get('RATE', '?')} req/s"],
                   rows))
    else:
        w("(no proxy processes in this run)")
    w("")

    w("## Per round")
    w("")
    rows = []
    for d in data.values():
        for r in d["rounds"]:
            rows.append([
                d["name"], str(r["round"]), fmt_ms(r.get("p50_ms")), fmt_ms(r.get("p99_ms")),
                fmt_ms(r.get("p999_ms")), fmt_rps(r.get("rps")), fmt_rps(r.get("max_rps")),
                str((r.get("errors") or 0) + (r.get("non_200") or 0)
                    + (r.get("wrk_non_2xx") or 0) + (r.get("wrk_socket_errors") or 0)),
            ])
    w(md_table(["path", "round", "p50 ms", "p99 ms", "p99.9 ms", "oha req/s",
                "wrk req/s", "errors"], rows))
    w("")

    w("## Commands")
    w("")
    w("Everything listens on 127.0.0.1; paths are relative to the repository root.")
    w("")
    w("```sh")
    cmds = res / "commands.txt"
    w(cmds.read_text().rstrip() if cmds.exists() else "# (commands.txt missing)")
    w("```")
    w("")

    # Sections written by hand (other tools' tables, before/after runs)
    # follow a marker line; a new run keeps them.
    dest = Path(args.out)
    if dest.exists():
        kept = dest.read_text().split(HAND_WRITTEN, 1)
        if len(kept) == 2:
            out.append(HAND_WRITTEN + kept[1].rstrip("\n"))
            out.append("")
    dest.write_text("\n".join(out))
    print(f"wrote {args.out}")


HAND_WRITTEN = "<!-- Sections below are kept by report.py when it rewrites this file. -->"


# --------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("rss")
    p.add_argument("procs", nargs="+")
    p.set_defaults(func=cmd_rss)

    p = sub.add_parser("rssmon")
    p.add_argument("--out", required=True, help="JSON file for max RSS / CPU per process")
    p.add_argument("--stdout", help="file for the command's standard output")
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("procs", nargs="*", help="NAME=PID ...")
    p.set_defaults(func=cmd_rssmon)

    p = sub.add_parser("oha")
    p.add_argument("file")
    p.set_defaults(func=cmd_oha)

    p = sub.add_parser("wrk")
    p.add_argument("file")
    p.set_defaults(func=cmd_wrk)

    p = sub.add_parser("render")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_render)

    argv = sys.argv[1:]
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1 :]
    args = ap.parse_args(argv)
    args.command = command
    if args.cmd == "rssmon" and not command:
        ap.error("rssmon needs a command after --")
    args.func(args)


if __name__ == "__main__":
    main()
