"""`baton bench --config FILE --output DIR`: runs a benchmark config against routers and writes the results.

A config (YAML or JSON) names the configurations to compare and how to load them:

    configurations:              # a list of {name, router | launch} (or a mapping name -> {router | launch})
      - name: 1P1D
        launch: {prefill: 1, decode: 1, threads: 1}   # ClusterSpec fields: prefill, decode, colocated,
                                                      # threads, pin, chunked_prefill, model, node_args
      - name: remote
        router: 10.0.0.5:50051                        # an already running cluster
    workload: {...}              # see baton.bench.workload
    mode: open                   # open (rates) or closed (concurrency)
    rates: [1, 2, 4]             # open loop: a sweep, requests/s; arrival: poisson (default) or fixed
    concurrency: 4               # closed loop: an int or a list (a sweep)
    duration_s: 60               # and/or num_requests: whichever ends first
    warmup_requests: 4
    request_timeout_s: 120
    seed: 0
    repeats: 1                   # run every point this many times, repeat k with seed + k (other requests and
                                 # arrivals); configurations take turns, so drift of a noisy machine hits all
    baseline: 1P1D               # the configuration the others are compared with (default: the first)
    calibration_requests: 5      # per configuration, sent one at a time before any load: its unloaded
                                 # TTFT and TPOT (medians)
    slo: {ttft: 20x, tpot: 2x}   # goodput counts requests meeting both: multiples of the baseline's
                                 # unloaded figures, or milliseconds ({ttft_ms: 1000, tpot_ms: 12}; the
                                 # top-level slo_ttft_ms / slo_tpot_ms still work); see baton.bench.slo

A launched configuration's `model` defaults to a random ~51M-parameter Llama written once into
DIR/model (bench/engine_throughput.py's), `model: default` is the bundled stories260K, anything else a
checkpoint folder. Configurations are launched one at a time and stopped before the next starts, so they
never share the machine's cores. Every sweep point sends the same requests (the workload's seed).

One SLO holds for every configuration of a run: a relative bound is a multiple of the *baseline*
configuration's unloaded figures, not of each configuration's own, so that goodputs compare (a setup that is
slow even when idle must not earn a looser bound for it). summary.json's `comparison` gives every
configuration's ratios to the baseline (baton.bench.comparison).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baton.bench.comparison import compare
from baton.bench.loadgen import LoadSpec, RequestRecord, calibrate, run_async, run_load
from baton.bench.metrics import SLO, summarize
from baton.bench.report import comparison_table, plot_cdfs, plot_sweep, slo_line, table, write_json, write_raw
from baton.bench.slo import SLOSpec, Unloaded, parse_slo
from baton.bench.workload import WorkloadSpec, prepare
from baton.router.client import AsyncBatonClient, BatonError

LAUNCH_KEYS = ("prefill", "decode", "colocated", "threads", "pin", "chunked_prefill", "model", "node_args")
TOP_KEYS = {"name", "configurations", "workload", "mode", "rates", "arrival", "concurrency", "duration_s",
            "num_requests", "warmup_requests", "request_timeout_s", "seed", "repeats", "slo_ttft_ms", "slo_tpot_ms",
            "slo", "baseline", "calibration_requests"}
CALIBRATION_REQUESTS = 5  # enough for a median that one slow first request cannot move; ~seconds per configuration


@dataclass(slots=True)
class Target:
    """One configuration: a running router's address, or a local cluster to launch."""
    name: str
    router: str = ""
    launch: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("configurations.name: must not be empty")
        if bool(self.router) == bool(self.launch):
            raise ValueError(f"configurations.{self.name}: give exactly one of `router` and `launch`")
        unknown = set(self.launch) - set(LAUNCH_KEYS)
        if unknown:
            raise ValueError(f"configurations.{self.name}.launch.{sorted(unknown)[0]}: unknown key "
                             f"(one of {', '.join(LAUNCH_KEYS)})")


@dataclass(slots=True)
class BenchConfig:
    """A parsed, validated config; `points` is the sweep (rates or concurrencies)."""
    targets: list[Target]
    workload: WorkloadSpec
    load: LoadSpec  # rate / concurrency filled per point
    points: list[float]
    slo: SLOSpec  # as configured; resolved into milliseconds once the baseline's unloaded figures are measured
    repeats: int = 1
    baseline: str = ""  # a configuration's name: the reference of the comparison and of relative SLOs
    calibration_requests: int = CALIBRATION_REQUESTS

    @property
    def axis(self) -> str:
        return "rate" if self.load.mode == "open" else "clients"


def _targets(obj: Any) -> list[Target]:
    if isinstance(obj, Mapping):
        obj = [{"name": k, **v} for k, v in obj.items()]
    if not isinstance(obj, list) or not obj:
        raise ValueError("configurations: must be a non-empty list (or mapping) of configurations")
    out = []
    for i, c in enumerate(obj):
        if not isinstance(c, Mapping):
            raise ValueError(f"configurations[{i}]: must be a mapping")
        unknown = set(c) - {"name", "router", "launch"}
        if unknown:
            raise ValueError(f"configurations[{i}].{sorted(unknown)[0]}: unknown key")
        out.append(Target(str(c.get("name", f"config{i}")), str(c.get("router", "")), dict(c.get("launch") or {})))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError("configurations.name: names must be unique")
    return out


def parse_config(config: Mapping[str, Any]) -> BenchConfig:
    unknown = set(config) - TOP_KEYS
    if unknown:
        raise ValueError(f"{sorted(unknown)[0]}: unknown key")
    mode = config.get("mode", "open")
    if mode == "open":
        points = config.get("rates", [1.0])
        key = "rates"
    else:
        points = config.get("concurrency", 1)
        key = "concurrency"
    points = points if isinstance(points, list) else [points]
    if not points:
        raise ValueError(f"{key}: must not be empty")
    try:
        points = [float(p) for p in points]
    except (TypeError, ValueError):
        raise ValueError(f"{key}: must be numbers, not {points!r}") from None
    load = LoadSpec(mode=mode, rate=points[0] if mode == "open" else 1.0, arrival=config.get("arrival", "poisson"),
                    concurrency=int(points[0]) if mode == "closed" else 1, num_requests=config.get("num_requests"),
                    duration_s=config.get("duration_s"), warmup_requests=int(config.get("warmup_requests", 0)),
                    request_timeout_s=float(config.get("request_timeout_s", 120.0)), seed=int(config.get("seed", 0)))
    for p in points:  # every point must be valid before the first cluster starts, not half-way through
        _point(load, p)
    if "workload" not in config:
        raise ValueError("workload: missing")
    repeats = config.get("repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: must be an int >= 1, not {repeats!r}")
    targets = _targets(config.get("configurations"))
    slo = parse_slo(config)
    return BenchConfig(targets, WorkloadSpec.parse(config["workload"]), load, points, slo, repeats,
                       _baseline(config, targets), _calibration_requests(config, slo))


def _baseline(config: Mapping[str, Any], targets: list[Target]) -> str:
    """The configuration named by `baseline`, else the first: one reference for ratios and relative SLOs."""
    names = [t.name for t in targets]
    if "baseline" not in config:
        return names[0]
    name = config["baseline"]
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"baseline: must name a configuration (one of {', '.join(map(repr, names))}), "
                         f"not {name!r}")
    return name


def _calibration_requests(config: Mapping[str, Any], slo: SLOSpec) -> int:
    n = config.get("calibration_requests", CALIBRATION_REQUESTS)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"calibration_requests: must be an int >= 0, not {n!r}")
    if n == 0 and slo.relative:
        raise ValueError("calibration_requests: a relative SLO needs at least 1 (the unloaded figures it multiplies)")
    return n


def _point(load: LoadSpec, point: float, seed: int | None = None) -> LoadSpec:
    kw = {name: getattr(load, name) for name in LoadSpec.__slots__}
    if seed is not None:
        kw["seed"] = seed
    if load.mode == "open":
        kw["rate"] = point
    else:
        if point != int(point):
            raise ValueError(f"concurrency: must be whole numbers, not {point}")
        kw["concurrency"] = int(point)
    return LoadSpec(**kw)


def _label(point: float) -> str:
    """The results key of a sweep point: "2" rather than "2.0", "inf" for all-at-once."""
    return str(int(point)) if math.isfinite(point) and point == int(point) else str(point)


def git_commit(start: Path | None = None) -> str:
    """The short hash of HEAD, read from .git without running git (absent on many benchmark hosts)."""
    here = (start or Path(__file__)).resolve()
    for folder in [here, *here.parents]:
        git = folder / ".git"
        if git.is_file():  # a worktree or submodule: "gitdir: PATH"
            git = (folder / git.read_text().split(":", 1)[1].strip()).resolve()
        if not git.is_dir():
            continue
        try:
            head = (git / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return head[:7]
            ref = head[4:].strip()
            common = git / "commondir"
            roots = [git] + ([(git / common.read_text().strip()).resolve()] if common.is_file() else [])
            for root in roots:
                if (root / ref).is_file():
                    return (root / ref).read_text().strip()[:7]
                packed = root / "packed-refs"
                if packed.is_file():
                    for line in packed.read_text().splitlines():
                        if line.endswith(" " + ref):
                            return line.split()[0][:7]
        except OSError:
            return ""
        return ""
    return ""


def _model(launch: Mapping[str, Any], output_dir: Path) -> str:
    """The checkpoint a launched cluster serves (see the module docstring)."""
    model = launch.get("model")
    if model == "default":
        return ""
    if model:
        return str(model)
    folder = output_dir / "model"
    if not (folder / "config.json").is_file():  # written once, then shared by every configuration
        from baton.bench.engine_throughput import write_checkpoint

        folder.mkdir(parents=True, exist_ok=True)
        write_checkpoint(folder)
    return str(folder)


def _cluster_spec(target: Target, output_dir: Path):
    from baton.cluster.launch import ClusterSpec

    launch = dict(target.launch)
    if launch.get("colocated") and "prefill" not in launch and "decode" not in launch:
        launch["prefill"] = launch["decode"] = 0  # ClusterSpec defaults to 1P1D; `colocated: 2` means just 2
    launch["model"] = _model(launch, output_dir)
    launch["node_args"] = [str(a) for a in launch.get("node_args", [])]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in target.name)
    try:
        return ClusterSpec(**launch, log_dir=str(output_dir / "logs" / safe))
    except (TypeError, ValueError) as e:
        raise ValueError(f"configurations.{target.name}.launch: {e}") from None


@dataclass(slots=True)
class TargetRuns:
    """What one configuration produced, over every repeat."""
    points: dict[str, list[tuple[list[RequestRecord], float]]] = field(default_factory=dict)  # (records, wall_s)
    calibration: list[RequestRecord] = field(default_factory=list)  # requests sent one at a time, every repeat's


def _report_calibration(name: str, records: list[RequestRecord]) -> None:
    u = Unloaded.from_records(records)
    ok = sum(r.error is None for r in records)
    ttft = "-" if u.ttft_ms is None else f"{u.ttft_ms:.1f} ms"
    tpot = "-" if u.tpot_ms is None else f"{u.tpot_ms:.2f} ms"
    print(f"baton bench: {name} unloaded: TTFT {ttft}, TPOT {tpot} (medians of {ok}/{len(records)} requests sent "
          f"one at a time)", file=sys.stderr, flush=True)


def _measure(address: str, cfg: BenchConfig, repeat: int, progress: bool, out: TargetRuns, name: str) -> None:
    """The calibration requests, then every sweep point once, with the repeat's seed; appends to `out`."""
    seed = cfg.load.seed + repeat

    async def go() -> None:
        async with AsyncBatonClient(address, timeout=60) as client:
            make_requests = await prepare(cfg.workload, seed, client)
        if cfg.calibration_requests:
            # Before any load, so nothing queues ahead of them; the workload's own shapes, so that the
            # multiples of a relative SLO are of what this workload costs alone
            records = await calibrate(address, make_requests(), cfg.calibration_requests, cfg.load.request_timeout_s)
            out.calibration.extend(records)
            _report_calibration(name, records)
        for point in cfg.points:
            spec = _point(cfg.load, point, seed)
            spec.progress = progress
            result = await run_load(address, make_requests(), spec)
            for r in result.records:
                r.repeat = repeat
            out.points.setdefault(_label(point), []).append((result.records, result.wall_s))
            measured = [r for r in result.records if not r.warmup]
            ok = sum(r.error is None for r in measured)
            again = f" (repeat {repeat + 1}/{cfg.repeats})" if cfg.repeats > 1 else ""
            print(f"baton bench: {name} {cfg.axis} {_label(point)}{again}: {ok}/{len(measured)} requests completed "
                  f"in {result.wall_s:.1f} s", file=sys.stderr, flush=True)

    run_async(go())


def _run_target(target: Target, cfg: BenchConfig, output_dir: Path, repeat: int, progress: bool,
                runs: TargetRuns) -> None:
    t = time.perf_counter()
    if target.router:
        _measure(target.router, cfg, repeat, progress, runs, target.name)
        return
    from baton.cluster.launch import LocalCluster

    spec = _cluster_spec(target, output_dir)  # a bad spec is the config's error: raised, not skipped
    with LocalCluster(spec) as cluster:
        print(f"baton bench: {target.name} up at {cluster.address} in {time.perf_counter() - t:.1f} s",
              file=sys.stderr, flush=True)
        _measure(cluster.address, cfg, repeat, progress, runs, target.name)


def _pooled(runs: list[tuple[list[RequestRecord], float]], slo: SLO | None) -> dict:
    """One point's summary over all its repeats (percentiles of the pooled requests, rates over the summed
    windows), and with several repeats each one's headline figures, to show the spread. `slo` None: an
    SLO that could not be resolved, so goodput is null rather than judged by no bound at all."""
    judge = slo or SLO()
    summary = summarize([r for recs, _ in runs for r in recs], sum(wall for _, wall in runs), judge)
    if len(runs) > 1:
        each = [summarize(recs, wall, judge) for recs, wall in runs]
        summary["repeats"] = [{"ttft_p99_ms": e["ttft_ms"]["p99"], "tpot_p99_ms": e["tpot_ms"]["p99"],
                               "goodput_rps": e["goodput_rps"], "throughput_tok_s": e["throughput_tok_s"]}
                              for e in each]
    if slo is None:
        summary["goodput_rps"] = summary["slo_attainment"] = None
        for e in summary.get("repeats", []):
            e["goodput_rps"] = None
    return summary


def resolve_slo(cfg: BenchConfig, unloaded: Mapping[str, Unloaded]) -> tuple[SLO | None, dict]:
    """The SLO goodput is judged by, and its summary.json record: the milliseconds, the configured multiples,
    and for a relative SLO which configuration's unloaded figures it multiplied. (None, record with
    `error`) when a multiple has nothing to multiply (the baseline failed, or none of its calibration
    requests completed): the run's figures are still written, without goodput."""
    base = unloaded.get(cfg.baseline)
    record: dict = {"ttft_ms": None, "tpot_ms": None, **cfg.slo.describe(), "relative_to": None}
    if cfg.slo.relative:
        record["relative_to"] = cfg.baseline
        record["relative_to_unloaded"] = None if base is None else {"ttft_ms": base.ttft_ms, "tpot_ms": base.tpot_ms}
    try:
        slo = cfg.slo.resolve(base)
    except ValueError as e:
        record["error"] = f"baseline: {cfg.baseline!r} did not run" if base is None else str(e)
        print(f"baton bench: the SLO cannot be resolved ({record['error']}): goodput is left out",
              file=sys.stderr, flush=True)
        return None, record
    record["ttft_ms"], record["tpot_ms"] = slo.ttft_ms, slo.tpot_ms
    return slo, record


def run_config(config: Mapping[str, Any], output_dir: Path, *, progress: bool = True) -> dict:
    """Runs every configuration and sweep point (`repeats` times, configurations taking turns); writes
    summary.json, raw.json and the plots into `output_dir`, prints the table, and returns the summary."""
    from baton.bench.engine_throughput import machine

    cfg = parse_config(config)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    runs = {t.name: TargetRuns() for t in cfg.targets}
    failed: dict[str, str] = {}
    for repeat in range(cfg.repeats):
        for target in cfg.targets:
            if target.name in failed:
                continue
            try:
                _run_target(target, cfg, output_dir, repeat, progress, runs[target.name])
            except (RuntimeError, TimeoutError, OSError, BatonError) as e:
                # One configuration that cannot start or serve is recorded, and the others still run.
                failed[target.name] = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                print(f"baton bench: {target.name} failed: {failed[target.name]}", file=sys.stderr, flush=True)
    runs = {name: tr for name, tr in runs.items() if name not in failed}
    if not runs:
        raise RuntimeError(f"no configuration ran: {failed}")
    unloaded = {name: Unloaded.from_records(tr.calibration) for name, tr in runs.items()}
    slo, slo_record = resolve_slo(cfg, unloaded)
    points = {name: tr.points for name, tr in runs.items()}
    results = {name: {p: _pooled(rs, slo) for p, rs in by_point.items()} for name, by_point in points.items()}
    raw = {name: {p: [r for recs, _ in rs for r in recs] for p, rs in by_point.items()}
           for name, by_point in points.items()}
    walls = {name: {p: sum(w for _, w in rs) for p, rs in by_point.items()} for name, by_point in points.items()}
    comparison = compare(results, cfg.baseline)
    summary = {"machine": machine(), "commit": git_commit(), "config": dict(config), "slo": slo_record,
               "unloaded": {name: u.to_dict() for name, u in unloaded.items()}, "results": results,
               "comparison": comparison, "failed": failed}
    write_json(output_dir / "summary.json", summary)
    write_raw(output_dir / "raw.json", raw, walls)
    plot_cdfs(output_dir / "latency_cdf.png", raw)
    if len(cfg.points) > 1:
        plot_sweep(output_dir / "sweep.png", results, cfg.axis)
    print(table(results, cfg.axis))
    print(slo_line(slo_record))
    print(comparison_table(comparison, cfg.axis))
    return summary


def load_config(path: Path) -> dict:
    import yaml

    config = yaml.safe_load(Path(path).read_text())  # YAML is a superset of JSON: one reader for both
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a bench config must be a mapping")
    return config


def run_command(config_path: Path, output: Path, progress: bool = True) -> int:
    """`baton bench` (cluster/cli.py parses its flags): the exit status."""
    try:
        run_config(load_config(config_path), output, progress=progress)
    except ValueError as e:
        print(f"baton bench: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # every configuration failed (each is printed as it fails)
        print(f"baton bench: error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m baton.bench.runner --config FILE --output DIR`, the same as `baton bench`."""
    from baton.cluster.cli import main as baton_main

    return baton_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
