#!/usr/bin/env python3
"""The one-call GPU check: build against this machine's torch, ``lcm_fast.info``, every CUDA test,
compute-sanitizer (memcheck, racecheck) over a launch of every kernel, then the GPU benchmarks; one summary table.

Run from the repository root, on the machine with the GPU::

    python3 scripts/gpu_check.py                      # every stage, within --budget seconds (480)
    python3 scripts/gpu_check.py --stages tests,memcheck

Stages run in priority order, each under its own timeout, inside the total budget: a stage that cannot start
before the budget is spent is reported as skipped, so the table always comes. Without a GPU the GPU stages are
reported skipped and the rest runs (the script works end to end on CPU). Logs (``stages.log``), the benchmarks'
JSON (``bench-<stage>.json``) and the table (``summary.txt``) go to ``--out`` (default ``$OUT``, else
``gpu_check_out/``). Exit status 1 when a stage failed or timed out.

The parity tests read ``../shared/fixtures/reference_lcm`` or ``$LCM_FAST_REFERENCE_FIXTURES``: on a machine
without them (a device machine receives the checkout alone) copy them along and set the variable, or the tests
stage reports ``tests/parity`` as a collection error.

The build follows ``../shared/notes/toolchain.md`` section 5: ``pip install --no-build-isolation --no-deps -e .``
with nvcc from ``/usr/local/cuda/bin`` and ``TORCH_CUDA_ARCH_LIST`` set to this GPU's compute capability.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PYTEST = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
CUDA_BIN = Path("/usr/local/cuda/bin")


@dataclass
class Stage:
    name: str
    command: Callable[[Path], list[str]]  # out dir -> argv
    timeout: int  # seconds
    gpu: bool  # skipped without a GPU
    figures: Callable[[str, Path], str]  # (log, out dir) -> key figures for the table
    env: Optional[dict] = None
    show: bool = False  # print the whole log (else only a failure's tail)


def _gpu() -> Optional[tuple[str, str]]:
    """(name, compute capability 'major.minor') of GPU 0, or None. Asked in a subprocess: this process must not
    hold a CUDA context while the stages run."""
    code = ("import sys, torch\nif not torch.cuda.is_available(): sys.exit(3)\n"
            "c = torch.cuda.get_device_capability()\nprint(torch.cuda.get_device_name(), f'{c[0]}.{c[1]}', sep='|')")
    try:
        out = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    name, capability = out.stdout.strip().split("|")
    return name, capability


def _last(pattern: str, log: str, default: str = "") -> str:
    found = re.findall(pattern, log, re.M)
    return found[-1] if found else default


def _pytest_counts(log: str, _out: Path) -> str:
    return _last(r"^=*\s*(\d+ (?:passed|failed|skipped|deselected|error).*?)\s*=*$", log, "no summary line")


def _info(log: str, _out: Path) -> str:
    archs = _last(r"CUDA kernels: (.*)$", log, "?")
    missing = re.findall(r"^  (\S+) +cuda +ref +\(no cuda kernel compiled", log, re.M)
    return f"CUDA kernels: {archs}; ops without their CUDA kernel: {', '.join(missing) or 'none'}"


def _sanitizer(log: str, _out: Path) -> str:
    summaries = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: (.*)$", log, re.M)
    return "; ".join(dict.fromkeys(summaries)) or "no sanitizer summary"


def _benchmarks(out: Path, stage: str) -> list[dict]:
    path = out / f"bench-{stage}.json"
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("benchmarks", [])


def _train(log: str, out: Path) -> str:
    rows = []
    for b in _benchmarks(out, "train"):
        e = b["extra_info"]
        mfu = f" (MFU {e['mfu']:.1%})" if e.get("mfu") is not None else ""
        steady = f" (MFU {e['steady_mfu']:.1%})" if e.get("steady_mfu") is not None else ""
        rows.append(f"{e['variant']} {e['size']}: 3-step call {e['achieved_tflops']:.0f} TFLOP/s{mfu}, steady step "
                    f"{e['steady_tflops']:.0f} TFLOP/s{steady}, {e['steady_concepts_per_s']:.0f} concepts/s")
    return "; ".join(rows) or _pytest_counts(log, out)


def _generate(log: str, out: Path, stage: str = "generate") -> str:
    rows = []
    for b in _benchmarks(out, stage):
        e = b["extra_info"]
        case = (f"{e['engine']} {e['dtype']}{' ' + e['weights'] if e.get('weights') else ''}"
                f"{' graphs' if e.get('cuda_graphs') else ''}{' inductor' if e.get('inductor') else ''} b{e['batch']} "
                f"c{e['context']}")
        text = f"{case}: {1e3 / e['sentences_per_s']:.2f} ms/sentence"
        if "weight_bytes_per_s" in e:
            text += (f" ({e['weight_bytes_per_s'] / 1e9:.0f} GB/s weights = "
                     f"{e['weight_bytes_per_s'] / e['peak_copy_bytes_per_s']:.0%} of the copy peak)")
        rows.append(text)
    return "; ".join(rows) or _pytest_counts(log, out)


def _rvq(log: str, out: Path) -> str:
    rows = []
    for b in _benchmarks(out, "rvq"):
        e = b["extra_info"]
        case = f"{e['op'].removeprefix('rvq_')} {e['M']}x{e['K']}"
        if e["op"] == "rvq_encode":
            rows.append(f"{case}: {e['vectors_per_s'] / 1e3:.0f}k vectors/s, {e['tflops']:.0f} TFLOP/s "
                        f"({e['search_resolved']}) = {e['speedup']:.1f}x the fp32 search, {e['vector_match']:.2%} same")
        elif e["op"] == "rvq_train":
            scaled = f", paper-scaled {e['paper_scaled_s']:.0f} s" if e.get("paper_scaled_s") else ""
            rows.append(f"{case} n{e['n']} {e['search_resolved']}: {e['train_s']:.1f} s{scaled}")
        else:
            rows.append(f"{case}: {e['vectors_per_s'] / 1e3:.0f}k vectors/s")
    return "; ".join(rows) or _pytest_counts(log, out)


def _ops(log: str, out: Path) -> str:
    best: dict[str, float] = {}
    for b in _benchmarks(out, "ops"):
        e = b["extra_info"]
        if (e.get("backend") == "ext" or e.get("weights")) and "gbps" in e:
            name = f"{e['op']} {e['weights']}" if e.get("weights") else e["op"]  # packed: one per weight format
            best[name] = max(best.get(name, 0.0), e["gbps"])
    return "; ".join(f"{op} {gbps:.0f} GB/s" for op, gbps in best.items()) or _pytest_counts(log, out)


def _bench(paths: str, select: str, stage: str, *extra: str) -> Callable[[Path], list[str]]:
    return lambda out: [*PYTEST, *paths.split(), "-k", select, f"--benchmark-json={out / f'bench-{stage}.json'}",
                        *extra]


def _sanitize(tool: str) -> Callable[[Path], list[str]]:
    return lambda out: [str(CUDA_BIN / "compute-sanitizer"), "--tool", tool, "--error-exitcode", "1",
                        "--target-processes", "all", *PYTEST, "tests/ops/test_kernels_once.py", "-k", "cuda"]


STAGES = [  # priority order
    Stage("build", lambda out: [PY, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
          300, False, lambda log, out: _last(r"^(Successfully installed.*)$", log, "built")),
    Stage("info", lambda out: [PY, "-m", "lcm_fast.info"], 60, False, _info, show=True),
    Stage("tests", lambda out: [*PYTEST, "-k", "cuda and not inductor", "--continue-on-collection-errors", "tests"],
          300, True, _pytest_counts),
    Stage("memcheck", _sanitize("memcheck"), 180, True, _sanitizer, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}),
    Stage("racecheck", _sanitize("racecheck"), 180, True, _sanitizer),
    Stage("train", _bench("bench/bench_train.py", "gpu", "train"), 240, True, _train),
    Stage("generate", _bench("bench/bench_generate.py", "gpu and not inductor", "generate"), 240, True, _generate),
    Stage("rvq", _bench("bench/bench_rvq.py", "gpu", "rvq"), 200, True, _rvq),
    Stage("ops", _bench("bench/bench_ops.py", "cuda and not compile", "ops", "--benchmark-max-time=0.05"), 150, True,
          _ops),
    # Generator(inductor=True): its CUDA tests and the 1.6B step compiled, last (compiling takes minutes)
    Stage("inductor", _bench("tests/ops/test_cuda.py bench/bench_generate.py", "inductor", "inductor"), 300, True,
          lambda log, out: f"{_pytest_counts(log, out)}; {_generate(log, out, 'inductor')}"),
]


def _build_env(gpu: Optional[tuple[str, str]]) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", MAX_JOBS=str(os.cpu_count() or 4))
    if (CUDA_BIN / "nvcc").exists():
        env["PATH"] = f"{CUDA_BIN}:{env.get('PATH', '')}"
        env.setdefault("CUDACXX", str(CUDA_BIN / "nvcc"))
    if gpu is not None:
        env["TORCH_CUDA_ARCH_LIST"] = gpu[1]
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default=",".join(s.name for s in STAGES),
                        help="comma-separated stages to run (default: all, in priority order)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all stages together")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="logs and JSON go here")
    args = parser.parse_args()
    chosen = set(args.stages.split(","))
    if unknown := chosen - {s.name for s in STAGES}:
        parser.error(f"unknown stages {sorted(unknown)}; expected some of {[s.name for s in STAGES]}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)
    start, gpu = time.monotonic(), _gpu()
    env = _build_env(gpu)
    print(f"GPU: {gpu[0] + ' (sm ' + gpu[1] + ')' if gpu else 'none'}; python {sys.version.split()[0]}; budget "
          f"{args.budget:.0f} s; logs in {out}", flush=True)
    rows, failed = [], False
    with (out / "stages.log").open("w") as logs:
        for stage in STAGES:
            left = args.budget - (time.monotonic() - start)
            if stage.name not in chosen:
                continue
            if stage.gpu and gpu is None:
                rows.append((stage.name, "skipped (no GPU)", 0.0, ""))
                continue
            if stage.name in ("memcheck", "racecheck") and not (CUDA_BIN / "compute-sanitizer").exists():
                rows.append((stage.name, "skipped (no compute-sanitizer)", 0.0, ""))
                continue
            if left < 10:
                rows.append((stage.name, "skipped (budget spent)", 0.0, ""))
                continue
            timeout = int(min(stage.timeout, left))
            print(f"== {stage.name} (timeout {timeout} s)", flush=True)
            t0 = time.monotonic()
            try:
                proc = subprocess.run(stage.command(out), env={**env, **(stage.env or {})}, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, timeout=timeout)
                log, result = proc.stdout, "pass" if proc.returncode == 0 else f"FAIL (exit {proc.returncode})"
            except subprocess.TimeoutExpired as error:
                raw = error.stdout or b""
                log, result = raw.decode(errors="replace") if isinstance(raw, bytes) else raw, f"TIMEOUT ({timeout} s)"
            seconds = time.monotonic() - t0
            logs.write(f"===== {stage.name}: {result} in {seconds:.0f} s\n{log}\n")
            logs.flush()
            if result != "pass" or stage.show:
                failed |= result != "pass"
                print(log if stage.show else log[-4000:], flush=True)
            rows.append((stage.name, result, seconds, stage.figures(log, out)))
            if stage.name == "build" and result != "pass":
                break  # nothing else means anything without the extension
    table = _table(rows, gpu, time.monotonic() - start)
    (out / "summary.txt").write_text(table)
    print(table, flush=True)
    return 1 if failed else 0


def _table(rows: list, gpu: Optional[tuple[str, str]], total: float) -> str:
    lines = [f"gpu_check summary ({gpu[0] if gpu else 'no GPU'}; {total:.0f} s in all)",
             "| stage | result | seconds | key figures |", "|---|---|---:|---|"]
    lines += [f"| {name} | {result} | {seconds:.0f} | {figures} |" for name, result, seconds, figures in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
