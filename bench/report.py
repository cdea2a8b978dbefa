# ruff: noqa: RUF001  (the Markdown report uses the multiplication sign and the en dash on purpose)
"""Turn a run's raw measurements into a summary (JSON), a Markdown report and a PNG chart.

Every headline figure is a median over rounds, and every ratio is taken inside a round (Aura and
its baseline measured minutes apart at most) before the median is taken: the machine is shared and
noisy, and only same-round ratios cancel that noise out.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.stats import median, pct

# Goals are ratios to a baseline of the same round.
GOALS = {
    "cpu_ratio": 1.25,  # Aura's server CPU per event ÷ the bare Quart/hypercorn route's (the floor)
    "ttfe_ratio": 1.5,
    "parked_connections": 2,
    "parked_memory_ratio": 1.5,
    "approval_ratio": 2.0,
    "approval_cpu_ratio": 2.0,  # (A + B) CPU per approval ÷ the floor's
    "approval_redis_commands": 10,  # Redis commands per approval: its own (see approval_commands)
    "embedded_ratio": 2.0,  # server CPU per event on the in-process fakeredis ÷ Aura's on redis-server
}


def _same_round_ratios(numerators: list[dict[str, Any]], denominators: list[dict[str, Any]]) -> list[float]:
    """KiB per parked stream of one server over another's, round by round."""
    by_round = {row.get("round", 0): row["kib_per_stream_rss"] for row in denominators if row["kib_per_stream_rss"]}
    return [row["kib_per_stream_rss"] / by_round[row.get("round", 0)] for row in numerators
            if row["kib_per_stream_rss"] and row.get("round", 0) in by_round]


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("**met**" if ok else "**missed**")


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    rows = results["measurements"]
    summary: dict[str, Any] = {}

    # -- CPU per delivered event --------------------------------------------------------------
    cpu: dict[str, Any] = {}
    by = defaultdict(list)
    for row in rows:
        if row["phase"] == "cpu_per_event":
            # each pass of a round is its own sample: ratios are taken inside a pass
            by[(row["concurrency"], row["round"], row.get("pass_no", 0))].append(row)
    levels = sorted({c for c, _, _ in by})
    for level in levels:
        per_server: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        ratios, ratios_with_redis, floor_ratios, over_floor, langgraph_ratios = [], [], [], [], []
        others_over_floor: dict[str, list[float]] = defaultdict(list)
        for (c, _round, _pass), group in by.items():
            if c != level:
                continue
            found = {r["server"]: r for r in group}
            for name, r in found.items():
                for key in ("server_us_per_event", "redis_us_per_event", "client_us_per_event",
                            "redis_commands_per_event", "redis_info_us_per_event"):
                    if r.get(key) is not None:
                        per_server[name][key].append(r[key])
                per_server[name]["errors"].append(r["errors"])
                per_server[name]["peak_open"].append(r["peak_open"])
                per_server[name]["events"].append(r["events"])
            if "aura" in found and "peer" in found and found["peer"]["server_us_per_event"]:
                peer = found["peer"]["server_us_per_event"]
                ratios.append(found["aura"]["server_us_per_event"] / peer)
                ratios_with_redis.append((found["aura"]["server_us_per_event"]
                                          + found["aura"]["redis_us_per_event"]) / peer)
            if "floor" in found and "peer" in found and found["peer"]["server_us_per_event"]:
                floor_ratios.append(found["floor"]["server_us_per_event"] / found["peer"]["server_us_per_event"])
            if "aura" in found and "floor" in found and found["floor"]["server_us_per_event"]:
                over_floor.append(found["aura"]["server_us_per_event"] / found["floor"]["server_us_per_event"])
            if "floor" in found and found["floor"]["server_us_per_event"]:
                for name, r in found.items():  # Aura at another revision (`--against`) too
                    if name.startswith("aura@") and r["server_us_per_event"]:
                        others_over_floor[name].append(r["server_us_per_event"] / found["floor"]["server_us_per_event"])
            lg = found.get("langgraph", {}).get("server_us_per_event")
            au = found.get("aura", {}).get("server_us_per_event")
            if lg and au:
                langgraph_ratios.append(lg / au)
        cpu[str(level)] = {
            "servers": {name: {k: (median(v) if k not in ("errors", "events") else sum(v)) for k, v in d.items()}
                        for name, d in per_server.items()},
            "aura_over_peer": median(ratios), "aura_with_redis_over_peer": median(ratios_with_redis),
            "floor_over_peer": median(floor_ratios), "rounds": len(ratios),
            "aura_over_floor": median(over_floor), "aura_over_floor_by_round": over_floor,
            "others_over_floor_by_round": dict(others_over_floor),
            "langgraph_over_aura": median(langgraph_ratios),
        }
        ratio = cpu[str(level)]["aura_over_floor"]
        cpu[str(level)]["met"] = None if ratio is None else ratio <= GOALS["cpu_ratio"]
    summary["cpu_per_event"] = cpu

    # -- time to first event ------------------------------------------------------------------
    ttfe: dict[str, Any] = {}
    samples: dict[tuple[int, str, int], list[float]] = defaultdict(list)
    errors: dict[tuple[int, str], int] = defaultdict(int)
    for row in rows:
        if row["phase"] == "ttfe":
            samples[(row["concurrency"], row["server"], row["round"])].extend(row["ttfe_ms"])
            errors[(row["concurrency"], row["server"])] += row["errors"]
    for level in sorted({k[0] for k in samples}):
        servers: dict[str, Any] = {}
        for name in sorted({k[1] for k in samples if k[0] == level}):
            rounds = sorted(k[2] for k in samples if k[0] == level and k[1] == name)
            p50 = [pct(samples[(level, name, r)], 50) for r in rounds]
            p99 = [pct(samples[(level, name, r)], 99) for r in rounds]
            pooled = [v for r in rounds for v in samples[(level, name, r)]]
            servers[name] = {"p50_ms": median(p50), "p99_ms": median(p99), "pooled_p50_ms": pct(pooled, 50),
                             "pooled_p99_ms": pct(pooled, 99), "samples": len(pooled),
                             "errors": errors[(level, name)]}
        ttfe[str(level)] = {"servers": servers}
    floor1 = ttfe.get("1", {}).get("servers", {}).get("floor", {})
    for entry in ttfe.values():
        aura = entry["servers"].get("aura", {})
        floor_same = entry["servers"].get("floor", {})
        if aura.get("p99_ms") and floor1.get("p99_ms"):
            entry["aura_p99_over_floor_c1"] = aura["p99_ms"] / floor1["p99_ms"]
        if aura.get("p99_ms") and floor_same.get("p99_ms"):
            entry["aura_p99_over_floor_same_c"] = aura["p99_ms"] / floor_same["p99_ms"]
            entry["aura_p50_over_floor_same_c"] = aura["p50_ms"] / floor_same["p50_ms"]
    for level, entry in ttfe.items():
        aura = entry["servers"].get("aura", {})
        # The goal is held at concurrency 1 (÷ the floor at 1). A burst of new streams is held to
        # the same ratio against the floor under the same burst: ÷ the floor at concurrency 1
        # would ask 100 simultaneous connections to open as fast as one.
        ratio = entry.get("aura_p99_over_floor_c1" if level == "1" else "aura_p99_over_floor_same_c")
        entry["met"] = None if ratio is None else (ratio <= GOALS["ttfe_ratio"] and not aura.get("errors"))
    summary["ttfe"] = ttfe

    # -- approval latency ---------------------------------------------------------------------
    approval: dict[str, Any] = {}
    pooled_lat: dict[str, list[float]] = defaultdict(list)
    pooled_post: dict[str, list[float]] = defaultdict(list)
    approval_errors: dict[str, int] = defaultdict(int)
    round_p99: dict[str, list[float]] = defaultdict(list)
    # A, B and the load generator (rows of older runs lack A's and B's apart)
    cpu_s: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    # A's part of each approval: from the POST's answer to the `running` event read from A's stream
    a_side: dict[str, list[float]] = defaultdict(list)
    redis_commands: dict[str, list[float]] = defaultdict(list)
    redis_us: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["phase"] == "approval" and row.get("redis_commands_per_approval") is not None:
            redis_commands[row["server"]].append(row["redis_commands_per_approval"])
            redis_us[row["server"]].append(row["redis_info_us_per_approval"])
        if row["phase"] == "approval":
            cpu_s[row["server"]][0] += row.get("a_cpu_s", 0.0)
            cpu_s[row["server"]][1] += row.get("b_cpu_s", 0.0)
            cpu_s[row["server"]][2] += row.get("client_cpu_s", 0.0)
            pooled_lat[row["server"]].extend(row["latency_ms"])
            pooled_post[row["server"]].extend(row["post_ms"])
            a_side[row["server"]].extend(total - post for total, post in zip(row["latency_ms"], row["post_ms"],
                                                                              strict=True))
            approval_errors[row["server"]] += row["errors"]
            if row["p99_ms"] is not None:
                round_p99[row["server"]].append(row["p99_ms"])
    for name, lat in pooled_lat.items():
        approval[name] = {"n": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                          "post_p50_ms": pct(pooled_post[name], 50), "post_p99_ms": pct(pooled_post[name], 99),
                          "errors": approval_errors[name], "round_p99_ms": round_p99[name],
                          "a_side_p50_ms": pct(a_side[name], 50), "a_side_p99_ms": pct(a_side[name], 99),
                          "a_cpu_ms": cpu_s[name][0] / len(lat) * 1000 if lat and cpu_s[name][0] else None,
                          "b_cpu_ms": cpu_s[name][1] / len(lat) * 1000 if lat and cpu_s[name][1] else None,
                          "client_cpu_ms": cpu_s[name][2] / len(lat) * 1000 if lat and cpu_s[name][2] else None,
                          "servers_cpu_ms": (cpu_s[name][0] + cpu_s[name][1]) / len(lat) * 1000 if lat else None,
                          "redis_commands": median(redis_commands[name]), "redis_us": median(redis_us[name])}
    redis = [v for row in rows if row["phase"] == "redis_rtt" for v in row["latency_ms"]]
    if redis:
        approval["redis-floor"] = {"n": len(redis), "p50_ms": pct(redis, 50), "p99_ms": pct(redis, 99)}
    if "aura" in approval and "quart-floor" in approval:
        approval["aura_p99_over_floor"] = approval["aura"]["p99_ms"] / approval["quart-floor"]["p99_ms"]
        approval["aura_p50_over_floor"] = approval["aura"]["p50_ms"] / approval["quart-floor"]["p50_ms"]
        approval["met"] = approval["aura_p99_over_floor"] <= GOALS["approval_ratio"] and approval["aura"]["n"] >= 2000
        floor_cpu = approval["quart-floor"]["servers_cpu_ms"]
        if floor_cpu:
            approval["aura_cpu_over_floor"] = approval["aura"]["servers_cpu_ms"] / floor_cpu
            approval["cpu_met"] = approval["aura_cpu_over_floor"] <= GOALS["approval_cpu_ratio"]
        wake_only = approval.get("quart-floor (wake only)")
        if wake_only and wake_only["servers_cpu_ms"]:  # context: a floor writing one frame each side of its wait
            approval["aura_cpu_over_wake_only"] = approval["aura"]["servers_cpu_ms"] / wake_only["servers_cpu_ms"]
            approval["aura_p99_over_wake_only"] = approval["aura"]["p99_ms"] / wake_only["p99_ms"]
    own = [row for row in rows if row["phase"] == "approval_commands"]
    if own:
        approval["own_commands"] = own[-1]
        approval["own_commands_met"] = own[-1]["approval_commands_per_approval"] <= GOALS["approval_redis_commands"]
    if "aura (isolated)" in approval and "quart-floor (isolated)" in approval:
        approval["isolated_p99_over_floor"] = (approval["aura (isolated)"]["p99_ms"]
                                               / approval["quart-floor (isolated)"]["p99_ms"])
        approval["isolated_p50_over_floor"] = (approval["aura (isolated)"]["p50_ms"]
                                               / approval["quart-floor (isolated)"]["p50_ms"])
    summary["approval"] = approval

    # -- parked runs --------------------------------------------------------------------------
    # With several rounds a server's row is the round of its median KiB per stream; `rounds` keeps
    # every round's, and the ratios are the same-round ones (their median beside each round's).
    parked: dict[str, Any] = {}
    for row in rows:
        if row["phase"] == "parked":
            parked.setdefault(str(row["n"]), {"rounds": {}})["rounds"].setdefault(row["server"], []).append(row)
    for entry in parked.values():
        for server, measured in entry["rounds"].items():
            ranked = sorted(measured, key=lambda r: r["kib_per_stream_rss"] or 0.0)
            entry[server] = ranked[(len(ranked) - 1) // 2]
        for server in [s for s in entry["rounds"] if s.startswith("aura")]:
            ratios = _same_round_ratios(entry["rounds"][server], entry["rounds"].get("floor", []))
            if ratios:
                entry.setdefault("memory_ratios", {})[server] = {"median": median(ratios), "rounds": ratios}
        if "aura" in entry.get("memory_ratios", {}):
            entry["memory_ratio"] = entry["memory_ratios"]["aura"]["median"]
        for server in [s for s in entry["rounds"] if s.startswith("aura@")]:
            ratios = _same_round_ratios(entry["rounds"]["aura"], entry["rounds"][server])
            if ratios:
                entry.setdefault("aura_over_against", {})[server] = {"median": median(ratios), "rounds": ratios}
        aura, langgraph = entry.get("aura"), entry.get("langgraph")
        if aura and langgraph and aura.get("kib_per_stream_rss") and langgraph.get("kib_per_stream_rss"):
            entry["langgraph_memory_over_aura"] = langgraph["kib_per_stream_rss"] / aura["kib_per_stream_rss"]
        if aura:
            clients = aura["redis_clients_parked"]
            entry["signal_connections"] = clients.get("signals (Pub/Sub)", 0)
            entry["aura_connections"] = clients.get("total", 0)
            entry["met"] = (aura["errors_total"] == 0 and entry["signal_connections"] <= GOALS["parked_connections"]
                            and entry.get("memory_ratio", math.inf) <= GOALS["parked_memory_ratio"])
    summary["parked"] = parked

    # -- growth -------------------------------------------------------------------------------
    growth: dict[str, Any] = defaultdict(dict)
    cells: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    real_events: dict[int, int] = {}
    for row in rows:
        if row["phase"] in ("growth", "cpu_per_event") and row["server"] in ("aura", "peer"):
            target = row.get("target_events", 200)
            real_events[target] = row["events_per_run"] or real_events.get(target, 0)
            cells[(row["server"], target, row["concurrency"])].append(row["server_us_per_event"])
    for (name, target, level), values in cells.items():
        growth[name].setdefault(str(target), {})[str(level)] = median(values)
    spread = {}
    for name, by_events in growth.items():
        values = [v for d in by_events.values() for v in d.values() if v]
        spread[name] = max(values) / min(values) if values else None
    summary["growth"] = {"us_per_event": dict(growth), "events_per_run": {str(k): v for k, v in real_events.items()},
                         "max_over_min": spread}

    # -- Redis per event: owner-served (cpu_per_event) and owner + a follower on B (follow) --------
    follow: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["phase"] == "follow" and row.get("redis_commands_per_event") is not None:
            cell = follow[str(row["concurrency"])]
            cell["redis_commands_per_event"].append(row["redis_commands_per_event"])
            cell["redis_info_us_per_event"].append(row["redis_info_us_per_event"])
            cell["follower_us_per_event"].append(row["follower_us_per_event"])
            cell["errors"].append(row["errors"] + row["incomplete"])
    summary["follow"] = {level: {k: (sum(v) if k == "errors" else median(v)) for k, v in cell.items()}
                         for level, cell in follow.items()}

    # -- options ------------------------------------------------------------------------------
    options: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["phase"] == "options":
            options[row["server"]].append(row["server_us_per_event"])
    summary["options"] = {name: median(v) for name, v in options.items()}

    # -- embedded mode (in-process fakeredis) against real Redis, same rounds -----------------------
    embedded: dict[str, Any] = {}
    by_level: dict[int, dict[int, dict[str, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        if row["phase"] == "embedded":
            by_level[row["concurrency"]][row["round"]][row["server"]] = row
    for level, level_rounds in sorted(by_level.items()):
        pairs = [(r["aura (embedded)"], r["aura"]) for r in level_rounds.values()
                 if {"aura", "aura (embedded)"} <= r.keys()]
        over_aura = [e["server_us_per_event"] / a["server_us_per_event"] for e, a in pairs]
        over_aura_redis = [e["server_us_per_event"] / (a["server_us_per_event"] + a["redis_us_per_event"])
                           for e, a in pairs]
        embedded[str(level)] = {
            "embedded_us_per_event": median([e["server_us_per_event"] for e, _ in pairs]),
            "aura_us_per_event": median([a["server_us_per_event"] for _, a in pairs]),
            "aura_redis_us_per_event": median([a["redis_us_per_event"] for _, a in pairs]),
            "embedded_over_aura": median(over_aura), "embedded_over_aura_by_round": over_aura,
            "embedded_over_aura_with_redis": median(over_aura_redis),
            "errors": sum(e["errors"] + a["errors"] for e, a in pairs), "rounds": len(pairs)}
        ratio = embedded[str(level)]["embedded_over_aura"]
        embedded[str(level)]["met"] = None if ratio is None else ratio <= GOALS["embedded_ratio"]
    summary["embedded"] = embedded

    # -- against (the working tree's Aura vs another revision's, same run) ------------------------
    against: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        if row["phase"] == "against":
            cell = against[row["load"]].setdefault(row["server"],
                                                   {"us_per_event": [], "ttfe_p50_ms": [], "ttfe_p99_ms": []})
            cell["us_per_event"].append(row["server_us_per_event"])
            if row.get("ttfe_p99_ms") is not None:
                cell["ttfe_p50_ms"].append(row["ttfe_p50_ms"])
                cell["ttfe_p99_ms"].append(row["ttfe_p99_ms"])
    summary["against"] = {load: {name: {k: median(v) if v else None for k, v in cell.items()} | {
        "samples": len(cell["us_per_event"])} for name, cell in servers.items()} for load, servers in against.items()}
    return summary


def side_by_side(summary: dict[str, Any]) -> list[str]:
    """The headline table: each server on the same workloads (medians over rounds)."""
    names = ("aura", "langgraph", "peer", "floor")
    cpu = summary["cpu_per_event"]
    ttfe = summary["ttfe"]
    ap = summary["approval"]
    parked = summary["parked"]
    rows: list[tuple[str, dict[str, str]]] = []
    for level in cpu:
        s = cpu[level]["servers"]
        rows.append((f"server CPU µs per event, {level} stream{'s' if level != '1' else ''}",
                     {n: _fmt(s.get(n, {}).get("server_us_per_event")) for n in names}))
    for level in ttfe:
        s = ttfe[level]["servers"]
        rows.append((f"time to first event p50 / p99 ms, {level} new stream{'s' if level != '1' else ''}",
                     {n: f"{_fmt(s[n]['p50_ms'], 2)} / {_fmt(s[n]['p99_ms'], 2)}" if n in s else "–" for n in names}))
    approval_names = {"aura": "aura", "langgraph": "langgraph", "floor": "quart-floor"}
    rows.append(("approval → next event p50 / p99 ms",
                 {n: f"{_fmt(ap[k]['p50_ms'], 2)} / {_fmt(ap[k]['p99_ms'], 2)}" if (k := approval_names.get(n)) in ap
                  else "–" for n in names}))
    rows.append(("server CPU ms per approval (A + B)",
                 {n: _fmt(ap[k].get("servers_cpu_ms"), 2) if (k := approval_names.get(n)) in ap else "–"
                  for n in names}))
    for level in sorted(parked, key=int):
        entry = parked[level]
        if "langgraph" not in entry:
            continue
        rows.append((f"KiB RSS per parked run, {level} parked (stream open)",
                     {n: _fmt(entry[k]["kib_per_stream_rss"]) if (k := n) in entry else "–" for n in names}))
        rows.append((f"CPU to hold {level} parked runs, % of a core",
                     {n: _fmt(entry[k]["hold_cpu_pct"]) if (k := n) in entry else "–" for n in names}))
    out = ["", "## Side by side (medians over rounds)", "",
           "| measure | Aura | LangGraph dev | peer (sse-starlette) | floor (bare Quart) | LangGraph ÷ Aura |",
           "|---|---:|---:|---:|---:|---:|"]
    for label, cells in rows:
        try:
            ratio = float(cells["langgraph"].split(" / ")[0].replace(",", "")) / \
                float(cells["aura"].split(" / ")[0].replace(",", ""))
            ratio_text = f"{ratio:,.1f}×"
        except (ValueError, ZeroDivisionError):
            ratio_text = "–"
        out.append(f"| {label} | " + " | ".join(cells[n] for n in names) + f" | {ratio_text} |")
    return out


def markdown(results: dict[str, Any], summary: dict[str, Any], chart_name: str) -> str:
    machine = results["machine"]
    mode = results["mode"]
    out = [f"# Aura benchmark — {results['started_at'][:16].replace('T', ' ')} UTC ({mode['name']} mode)", ""]
    out.append(f"Duration {results['duration_s'] / 60:.1f} min, {mode['rounds']} interleaved rounds. Machine: "
               f"{machine.get('host', '?')}, {machine['cpus']} cores ({machine['cpu_model']}), "
               f"{machine['memory_gib']} GiB, Python "
               f"{machine['python']}, {machine['redis_server'].split(' sha')[0]}, load average at start "
               f"{', '.join(f'{x:.2f}' for x in machine['loadavg_start'])}. Load generator event loop: "
               f"{results['client_event_loop']}. Packages: "
               + ", ".join(f"{k} {v}" for k, v in machine["packages"].items() if v) + ".")
    if machine.get("langgraph_packages") and "langgraph_remote_connections" in results:  # LangGraph was run
        out.append("LangGraph's Agent Server (`langgraph dev`, its own locked virtualenv): "
                   + ", ".join(f"{k} {v}" for k, v in machine["langgraph_packages"].items())
                   + f"; connections beyond loopback seen: {results.get('langgraph_remote_connections') or 'none'}.")
    if machine.get("code"):
        out.append(f"Code measured: {machine['code']}"
                   + (f"; against {machine['against_commit']}" if machine.get("against_commit") else "")
                   + (f"; approvals' prompt {results['approval_prompt']!r}" if results.get("approval_prompt") else "")
                   + ".")
    if results.get("command"):
        out.append(f"Command: `{' '.join(results['command'])}`.")
    out += ["", f"![Aura vs its baselines]({chart_name})", ""]
    cal = results.get("calibration", {})
    out.append(f"An `@answer` run has {cal.get('overhead')} events besides its content chunks; mean frame sizes "
               f"(bytes by events per run): {cal.get('sizes')}. The baselines stream the same number of events "
               "of the same mean size.")

    out += side_by_side(summary)
    out += ["", "## Server CPU per delivered event (200 events per run)", "",
            "| concurrent streams | Aura µs/event | Redis µs/event (Aura's) | Redis commands/event (Aura's) | "
            "LangGraph dev µs/event | peer µs/event | floor µs/event | Aura ÷ floor (per pass) | Aura ÷ peer | "
            "LangGraph ÷ Aura | client µs/event (Aura / peer) | errors (Aura / LangGraph) | "
            f"goal Aura ÷ floor ≤ {GOALS['cpu_ratio']}× |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for level, entry in summary["cpu_per_event"].items():
        s = entry["servers"]
        a, p, f, lg = s.get("aura", {}), s.get("peer", {}), s.get("floor", {}), s.get("langgraph", {})
        rounds = ", ".join(f"{r:.2f}" for r in entry.get("aura_over_floor_by_round", []))
        out.append(f"| {level} (peak open {_fmt(a.get('peak_open'), 0)}) | {_fmt(a.get('server_us_per_event'))} | "
                   f"{_fmt(a.get('redis_us_per_event'))} | {_fmt(a.get('redis_commands_per_event'), 2)} | "
                   f"{_fmt(lg.get('server_us_per_event'))} | {_fmt(p.get('server_us_per_event'))} | "
                   f"{_fmt(f.get('server_us_per_event'))} | {_fmt(entry.get('aura_over_floor'), 2)}× ({rounds}) | "
                   f"{_fmt(entry['aura_over_peer'], 2)}× | {_fmt(entry.get('langgraph_over_aura'), 1)}× | "
                   f"{_fmt(a.get('client_us_per_event'))} / {_fmt(p.get('client_us_per_event'))} | "
                   f"{a.get('errors', 0)} / {lg.get('errors', '–')} | {_verdict(entry['met'])} |")
    passes = mode.get("throughput_passes") if isinstance(mode, dict) else None
    out += ["", "A pass is one measurement of each server at that concurrency, interleaved (LangGraph's in a "
            "round's first pass only); a round holds " + (", ".join(f"{k} at {c} streams" for c, k in passes.items())
                                                           if passes else "one pass at each concurrency") +
            ". Each ratio is taken inside a pass; the headline figures are medians over every pass of every round."]
    others = [(level, name, entry["servers"][name], ratios) for level, entry in summary["cpu_per_event"].items()
              for name, ratios in entry.get("others_over_floor_by_round", {}).items()]
    if others:
        out += ["", "Aura at another revision (`--against`), in the same rounds:", "",
                "| concurrent streams | server | µs/event | Redis commands/event | ÷ floor (per pass) |",
                "|---:|---|---:|---:|---:|"]
        out += [f"| {level} | {name} | {_fmt(s.get('server_us_per_event'))} | "
                f"{_fmt(s.get('redis_commands_per_event'), 2)} | {_fmt(median(ratios), 2)}× "
                f"({', '.join(f'{r:.2f}' for r in ratios)}) |" for level, name, s, ratios in others]
    if summary.get("follow"):
        out += ["", "### Redis per event: served by the owner, and by the owner plus a follower on B", "",
                "| concurrent runs | Redis commands/event, owner only | owner + follower | Redis µs/event (INFO cpu), "
                "owner only | owner + follower | follower B's CPU µs/event | errors |",
                "|---:|---:|---:|---:|---:|---:|---:|"]
        for level, cell in summary["follow"].items():
            owner = summary["cpu_per_event"].get(level, {}).get("servers", {}).get("aura", {})
            out.append(f"| {level} | {_fmt(owner.get('redis_commands_per_event'), 2)} | "
                       f"{_fmt(cell['redis_commands_per_event'], 2)} | {_fmt(owner.get('redis_info_us_per_event'))} | "
                       f"{_fmt(cell['redis_info_us_per_event'])} | {_fmt(cell['follower_us_per_event'])} | "
                       f"{cell['errors']} |")

    out += ["", "## Time to first event", "",
            "| concurrent new streams | server | p50 ms | p99 ms | samples | errors |",
            "|---:|---|---:|---:|---:|---:|"]
    for level, entry in summary["ttfe"].items():
        for name, s in entry["servers"].items():
            out.append(f"| {level} | {name} | {_fmt(s['p50_ms'], 2)} | {_fmt(s['p99_ms'], 2)} | {s['samples']} | "
                       f"{s['errors']} |")
    for level, entry in summary["ttfe"].items():
        out.append(f"\nAt {level}: Aura p99 ÷ floor p99 at concurrency 1 = "
                   f"{_fmt(entry.get('aura_p99_over_floor_c1'), 2)}×; ÷ floor p99 at the same concurrency = "
                   f"{_fmt(entry.get('aura_p99_over_floor_same_c'), 2)}× (goal ≤ {GOALS['ttfe_ratio']}× "
                   f"{'at concurrency 1' if level == '1' else 'at the same concurrency'}: "
                   f"{_verdict(entry.get('met'))}).")

    ap = summary["approval"]
    out += ["", "## Approval latency (approve POST on B → `tool_execution` running read from A)", "",
            "| path | approvals | p50 ms | p99 ms | POST answered p50 / p99 ms | then A's part p50 / p99 ms | "
            "CPU ms per approval, A / B / load generator | Redis per approved run: commands / µs CPU | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    # Rows of another revision (`--against REV --against-phases approvals`) follow Aura's own.
    others = sorted(name for name, entry in ap.items() if name.startswith("aura@") and isinstance(entry, dict))
    names = ("aura", "quart-floor", "quart-floor (wake only)", "langgraph", "aura (isolated)",
             "quart-floor (isolated)", "redis-floor", *others)
    for name in names:
        if name in ap:
            s = ap[name]
            out.append(f"| {name} | {s['n']} | {_fmt(s['p50_ms'], 2)} | {_fmt(s['p99_ms'], 2)} | "
                       f"{_fmt(s.get('post_p50_ms'), 2)} / {_fmt(s.get('post_p99_ms'), 2)} | "
                       f"{_fmt(s.get('a_side_p50_ms'), 2)} / {_fmt(s.get('a_side_p99_ms'), 2)} | "
                       f"{_fmt(s.get('a_cpu_ms'), 2)} / {_fmt(s.get('b_cpu_ms'), 2)} / "
                       f"{_fmt(s.get('client_cpu_ms'), 2)} | {_fmt(s.get('redis_commands'), 1)} / "
                       f"{_fmt(s.get('redis_us'), 0)} | {s.get('errors', 0)} |")
    if "aura_p99_over_floor" in ap:
        out.append(f"\nAura ÷ bare-Quart floor: p50 {ap['aura_p50_over_floor']:.2f}×, p99 "
                   f"{ap['aura_p99_over_floor']:.2f}× (goal p99 ≤ {GOALS['approval_ratio']}×: {_verdict(ap['met'])}).")
        per_round = [a / f for a, f in zip(ap["aura"]["round_p99_ms"], ap["quart-floor"]["round_p99_ms"], strict=False)]
        if len(per_round) > 1:
            out.append(f"Per round, p99 ÷ the same round's floor p99: {', '.join(f'{r:.2f}×' for r in per_round)} "
                       f"(median {median(per_round):.2f}×).")
        out.append("A's part is each approval's latency minus its POST's answer time: the signal reaching A, the "
                   "run's `running` event logged and written, the load generator reading it. CPU per approval is "
                   "each process's CPU time over the phase ÷ approvals: A parks the runs and finishes them after "
                   "their decision, B only answers the approve POSTs, the load generator opens, approves and reads "
                   "every stream to its end.")
    if "aura_cpu_over_floor" in ap:
        out.append(f"\nCPU per approval, A + B: Aura {_fmt(ap['aura']['servers_cpu_ms'], 2)} ms, the floor "
                   f"{_fmt(ap['quart-floor']['servers_cpu_ms'], 2)} ms: {ap['aura_cpu_over_floor']:.2f}× (goal ≤ "
                   f"{GOALS['approval_cpu_ratio']}×: {_verdict(ap['cpu_met'])}). LangGraph's row is one process "
                   "(its in-memory runtime parks and resumes in the same server): its CPU is under A.")
        shape = results.get("approval_shape")
        if shape:
            out.append(f"The floor's approval writes the frames Aura's approved run writes ({shape['before']} to "
                       f"the wait, {shape['after']} after it, {shape['size']} bytes each, measured from Aura's "
                       "runs at the start): the same wire work, without Aura's auth, agent, event log and "
                       "approval records.")
        if "aura_cpu_over_wake_only" in ap:
            out.append(f"Against a floor that writes one frame each side of its wait (`quart-floor (wake only)`, "
                       f"context): CPU {ap['aura_cpu_over_wake_only']:.2f}×, p99 {ap['aura_p99_over_wake_only']:.2f}×.")
    if "own_commands" in ap:
        own = ap["own_commands"]
        out.append(f"\nAn approval's own Redis commands (MONITOR over {own['approvals']} isolated approvals; a "
                   f"script's own calls counted): {_fmt(own['approval_commands_per_approval'], 1)} per approval "
                   f"(goal ≤ {GOALS['approval_redis_commands']}: {_verdict(ap['own_commands_met'])}): "
                   + ", ".join(f"{k.upper()} {v:.2f}" for k, v in own["approval_by_command"].items())
                   + f". Its run's other commands: {_fmt(own['run_commands_per_approval'], 1)} ("
                   + ", ".join(f"{k.upper()} {v:.1f}" for k, v in own["run_by_command"].items()) + ").")
    if "isolated_p99_over_floor" in ap:
        out.append(f"\nIsolated (each approval once the run before it has ended): Aura ÷ bare-Quart floor p50 "
                   f"{ap['isolated_p50_over_floor']:.2f}×, p99 {ap['isolated_p99_over_floor']:.2f}× (for "
                   "context: the goal is held to the back-to-back figure above).")

    out += ["", "## Parked runs (waiting for approval, heartbeats every 5 s)", "",
            "| N | server | parked | errors | heartbeats min | KiB/stream (RSS) | RSS parked MiB | hold CPU % | "
            "Redis CPU % | Redis connections | Aura ÷ floor memory | goal |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    several = any(len(measured) > 1 for entry in summary["parked"].values() for measured in entry["rounds"].values())
    for level, entry in summary["parked"].items():
        for name in ("aura", *sorted(s for s in entry["rounds"] if s.startswith("aura@")), "floor", "langgraph"):
            row = entry.get(name)
            if not row:
                continue
            aura = name.startswith("aura")
            clients = row["redis_clients_parked"] if aura else {}
            kib = _fmt(row["kib_per_stream_rss"])
            if len(entry["rounds"][name]) > 1:
                kib += " (" + ", ".join(_fmt(r["kib_per_stream_rss"]) for r in entry["rounds"][name]) + ")"
            ratio = entry.get("memory_ratios", {}).get(name)
            ratio_cell = ""
            if ratio:
                ratio_cell = _fmt(ratio["median"], 2) + "×"
                if len(ratio["rounds"]) > 1:
                    ratio_cell += " (" + ", ".join(_fmt(r, 2) for r in ratio["rounds"]) + ")"
            out.append(f"| {level} | {name} | {row['parked']} | {row['errors_total']} | {row['heartbeats_min']} | "
                       f"{kib} | {_fmt(row['rss_parked_mb'])} | "
                       f"{_fmt(row['hold_cpu_pct'])} | {_fmt(row['hold_redis_cpu_pct']) if aura else '–'} | "
                       f"{', '.join(f'{k} {v}' for k, v in clients.items()) or '–'} | {ratio_cell} | "
                       f"{_verdict(entry.get('met')) if name == 'aura' else ''} |")
    for level, entry in summary["parked"].items():
        for name, ratio in entry.get("aura_over_against", {}).items():
            out.append(f"\nAt {level} parked, Aura ÷ {name} (KiB per parked stream, same round): "
                       f"{_fmt(ratio['median'], 2)}× (" + ", ".join(_fmt(r, 2) for r in ratio["rounds"]) + ").")
    if several:
        out.append("\nWith several rounds: a row is the round of the server's median KiB per stream, the "
                   "figures in brackets each round's; the ratios are the same round's.")

    g = summary["growth"]
    out += ["", "## Growth: server µs per event by events per run and concurrency", ""]
    levels = sorted({int(c) for d in g["us_per_event"].values() for e in d.values() for c in e})
    out.append("| server | events/run | " + " | ".join(f"c={c}" for c in levels) + " |")
    out.append("|---|---:|" + "---:|" * len(levels))
    for name, by_events in g["us_per_event"].items():
        for target in sorted(by_events, key=int):
            cells = by_events[target]
            out.append(f"| {name} | {g['events_per_run'].get(target, target)} | "
                       + " | ".join(_fmt(cells.get(str(c))) for c in levels) + " |")
    out.append("\nLargest ÷ smallest cell: " + ", ".join(f"{k} {_fmt(v, 2)}×" for k, v in g["max_over_min"].items()))
    if summary.get("against"):
        out += ["", "## Against another revision (same run, interleaved; medians)", "",
                "| load | server | server µs/event | ttfe p50 / p99 ms | samples | ÷ the other revision |",
                "|---|---|---:|---:|---:|---:|"]
        for load, servers in summary["against"].items():
            revisions = list(servers)
            for name in revisions:
                cell = servers[name]
                other = next((servers[n] for n in revisions if n != name), None)
                key = "ttfe_p99_ms" if load.startswith("ttfe") else "us_per_event"
                ratio = cell[key] / other[key] if other and cell[key] and other[key] else None
                ttfe = f"{_fmt(cell.get('ttfe_p50_ms'), 2)} / {_fmt(cell['ttfe_p99_ms'], 2)}"
                out.append(f"| {load} | {name} | {_fmt(cell['us_per_event'])} | {ttfe} | "
                           f"{cell['samples']} | {_fmt(ratio, 2)}× |")
    if summary.get("embedded"):
        out += ["", "## Embedded mode: Aura on its in-process fakeredis against Aura on redis-server "
                "(same run, interleaved; 200 events per run; medians)", "",
                "| streams | embedded µs/event | Aura µs/event (+ redis-server's) | embedded ÷ Aura (per round) "
                "| embedded ÷ (Aura + redis-server) | ≤ 2× | errors |",
                "|---:|---:|---:|---:|---:|---|---:|"]
        for level, e in summary["embedded"].items():
            by_round = ", ".join(f"{v:.2f}" for v in e["embedded_over_aura_by_round"])
            out.append(f"| {level} | {_fmt(e['embedded_us_per_event'])} | {_fmt(e['aura_us_per_event'])} "
                       f"(+ {_fmt(e['aura_redis_us_per_event'])}) | {_fmt(e['embedded_over_aura'], 2)}× ({by_round}) "
                       f"| {_fmt(e['embedded_over_aura_with_redis'], 2)}× | {_verdict(e['met'])} | {e['errors']} |")
    if summary["options"]:
        out += ["", "## Options (concurrency 100, 200 events per run, server µs/event)", ""]
        out += [f"- {name}: {_fmt(v)}" for name, v in summary["options"].items()]
    return "\n".join(out) + "\n"


def chart(results: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    colors = {"aura": "#6b3fa0", "aura+redis": "#b59ad6", "peer": "#2a9d8f", "floor": "#e9a03b",
              "quart-floor": "#e9a03b", "redis-floor": "#888888", "langgraph": "#1c6dd0"}

    ax = axes[0][0]
    levels = list(summary["cpu_per_event"])
    width = 0.16
    series = (("aura", "server_us_per_event"), ("aura+redis", None), ("langgraph", "server_us_per_event"),
              ("peer", "server_us_per_event"), ("floor", "server_us_per_event"))
    for i, (name, key) in enumerate(series):
        values = []
        for level in levels:
            s = summary["cpu_per_event"][level]["servers"]
            if name == "aura+redis":
                a = s.get("aura", {})
                values.append((a.get("server_us_per_event") or 0) + (a.get("redis_us_per_event") or 0))
            else:
                values.append(s.get(name, {}).get(key) or 0)
        ax.bar([x + (i - 2) * width for x in range(len(levels))], values, width, label=name, color=colors[name])
    ax.set_xticks(range(len(levels)), [f"{lv} streams" for lv in levels])
    ax.set_yscale("log")
    ax.set_ylabel("server CPU µs per delivered event (log)")
    ax.set_title("CPU per event, 200 events/run (lower is better)")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    entries = []
    for level, entry in summary["ttfe"].items():
        for name, s in entry["servers"].items():
            entries.append((f"{name}\nc={level}", s["p50_ms"] or 0, s["p99_ms"] or 0, name))
    xs = range(len(entries))
    shades = [colors.get(e[3], "#999") for e in entries]
    ax.bar([x - 0.2 for x in xs], [e[1] for e in entries], 0.4, label="p50", color=shades)
    ax.bar([x + 0.2 for x in xs], [e[2] for e in entries], 0.4, label="p99", color=shades, alpha=0.5, hatch="//")
    ax.set_xticks(list(xs), [e[0] for e in entries], fontsize=7)
    ax.set_ylabel("ms")
    ax.set_yscale("log")
    ax.set_title("Time to first event: p50 (solid), p99 (hatched)")

    ax = axes[0][2]
    ap = summary["approval"]
    names = [n for n in ("aura", "quart-floor", "langgraph", "redis-floor") if n in ap]
    ax.bar([x - 0.2 for x in range(len(names))], [ap[n]["p50_ms"] for n in names], 0.4, label="p50",
           color=[colors[n] for n in names])
    ax.bar([x + 0.2 for x in range(len(names))], [ap[n]["p99_ms"] for n in names], 0.4, label="p99",
           color=[colors[n] for n in names], alpha=0.5, hatch="//")
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("Approval latency: p50 (solid), p99 (hatched)")

    ax = axes[1][0]
    growth = summary["growth"]["us_per_event"]
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd"]
    targets = sorted({t for d in growth.values() for t in d}, key=int)
    for name, style in (("aura", "-"), ("peer", "--")):
        for target, cells in sorted(growth.get(name, {}).items(), key=lambda kv: int(kv[0])):
            points = sorted((int(c), v) for c, v in cells.items() if v)
            if points:
                real = summary["growth"]["events_per_run"].get(target, target)
                ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o",
                        color=palette[targets.index(target) % len(palette)], label=f"{name}, {real} events/run")
    ax.set_xscale("log")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("server CPU µs per event")
    ax.set_title("Growth: cost per event (should stay flat)")
    ax.legend(fontsize=7)

    ax = axes[1][1]
    parked = summary["parked"]
    for name in ("aura", "floor", "langgraph"):
        measured = sorted((int(n), e[name]["kib_per_stream_rss"], e[name]["errors_total"]) for n, e in parked.items()
                          if name in e and e[name]["kib_per_stream_rss"])
        clean = [p for p in measured if p[2] == 0]
        if clean:
            ax.plot([p[0] for p in clean], [p[1] for p in clean], marker="o", label=f"{name}", color=colors[name])
        for n, kib, errors in measured:  # levels where streams failed: shown, but not part of the line
            if errors:
                ax.plot([n], [kib], marker="x", color=colors[name], markersize=10)
                ax.annotate(f"{errors} errors", (n, kib), textcoords="offset points", xytext=(5, 5), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("parked streams (one process)")
    ax.set_ylabel("KiB RSS per parked stream")
    ax.set_title("Memory per parked run vs the floor's idle stream (x: level with errors)")
    ax.legend(fontsize=8)

    ax = axes[1][2]
    client = []
    for level, entry in summary["cpu_per_event"].items():
        for name in ("aura", "langgraph", "peer", "floor"):
            s = entry["servers"].get(name, {})
            client.append((f"{name}\nc={level}", s.get("server_us_per_event") or 0, s.get("client_us_per_event") or 0,
                           name))
    xs = range(len(client))
    ax.bar([x - 0.2 for x in xs], [c[1] for c in client], 0.4, label="server", color=[colors[c[3]] for c in client])
    ax.bar([x + 0.2 for x in xs], [c[2] for c in client], 0.4, label="load generator", color="#cccccc")
    ax.set_xticks(list(xs), [c[0] for c in client], fontsize=7)
    ax.set_ylabel("CPU µs per event")
    ax.set_yscale("log")
    ax.set_title("Server vs load-generator CPU (grey: client; log)")

    fig.suptitle(f"Aura benchmark {results['started_at'][:10]} ({results['mode']['name']}, "
                 f"{results['machine']['cpus']} cores, medians of {results['mode']['rounds']} interleaved rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_reports(results: dict[str, Any], folder: Path, stamp: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarise(results)
    results["summary"] = summary
    json_path, md_path, png_path = folder / f"{stamp}.json", folder / f"{stamp}.md", folder / f"{stamp}.png"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    chart(results, summary, png_path)
    md_path.write_text(markdown(results, summary, png_path.name))
    return [json_path, md_path, png_path]


def main() -> None:
    """Re-render the reports of a results JSON: python -m bench.report bench/results/<date>.json"""
    import sys

    source = Path(sys.argv[1])
    results = json.loads(source.read_text())
    print(write_reports(results, source.parent, source.stem))


if __name__ == "__main__":
    main()
