"""Static GPU report: compile every hyperkern Triton kernel for the H100 (sm_90) without a GPU.

    python -m bench.static_gpu_report [--check] [--write-results] [--jobs N] [--only SUBSTRING]

Run from the repository root WITHOUT TRITON_INTERPRET (it is removed from the environment here:
interpreted kernels cannot be compiled). Every kernel is compiled at every config it can launch
with, by the real Triton compiler, through triton.compile(ASTSource(...)) for
GPUTarget("cuda", 90, 32); cuobjdump (bundled with Triton) then reads each cubin for

  - registers per thread, stack frame and local memory (non-zero stack / LDL / STL = spills),
  - shared memory (must fit the H100's 227 KiB per block),
  - the tensor-core instructions in the SASS: HGMMA (Hopper wgmma) for bf16 / fp16 / tf32 GEMM
    kernels, DMMA for fp64 GEMM kernels; HMMA in a Hopper GEMM build means a fall back to the
    Ampere path.

Kernel specs are collected from every module of kernels/ (installed as hyperkern.kernels) that
defines `sm90_compile_specs()`, returning a list of dicts with the keys
    name         readable kernel name and variant, e.g. "rank1_linear_forward[hyper]"
    fn           the @triton.jit function (not an autotuner wrapper)
    signature    {argument name: Triton type}, e.g. "*bf16", "i32", "fp32", "constexpr"
    constexprs   {argument name: value} for every "constexpr" entry
    attrs        optional {(argument index,): [["tt.divisibility", 16]]} specialisation hints
    num_warps, num_stages
    dtype        input dtype label: "bf16", "fp16", "fp32/tf32", "fp32/tf32x3", "fp64", ...
    gemm         True for kernels whose inner loop is tl.dot (they must use HGMMA, or DMMA for fp64)
    config       human-readable config string
so a new kernels/*.py module is picked up without touching this script.

--check exits with status 1 if any kernel fails to compile, spills, exceeds shared memory, or is a
GEMM build without the expected tensor-core instruction (or with HMMA). --write-results replaces the
"Static GPU report (sm_90)" section of docs/benchmark-history.md with the table.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import datetime
import importlib
import multiprocessing
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

from bench.common import cpu_name

SECTION = "## Static GPU report (sm_90)"
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "benchmark-history.md")
SM90_MAX_SHARED = 232448  # bytes of shared memory one block may opt into on an H100
_OPCODES = ("HGMMA", "HMMA", "DMMA", "LDL", "STL")
_SPEC_CACHE: dict = {}


def kernel_modules() -> list[str]:
    """Names of the hyperkern.kernels modules (kernels/*.py)."""
    import hyperkern.kernels as pkg

    return sorted(f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.ispkg)


def _specs(module_name: str) -> list:
    if module_name not in _SPEC_CACHE:
        module = importlib.import_module(module_name)
        make = getattr(module, "sm90_compile_specs", None)
        _SPEC_CACHE[module_name] = list(make()) if make is not None else []
    return _SPEC_CACHE[module_name]


def cuobjdump_path() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(bundled):
        return bundled
    found = shutil.which("cuobjdump")
    if found is None:
        raise SystemExit("static_gpu_report: cuobjdump not found (neither bundled with triton nor on PATH)")
    return found


def expected_mma(spec: dict) -> str | None:
    if not spec.get("gemm"):
        return None
    return "DMMA" if str(spec["dtype"]).startswith("fp64") else "HGMMA"


def _resources(cubin: bytes, workdir: str, tag: str) -> dict:
    path = os.path.join(workdir, f"{tag}.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    tool = cuobjdump_path()
    usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{usage}")
    regs, stack, _static_shared, local = map(int, found.groups())
    counts = {op: len(re.findall(rf"\b{op}\b", sass)) for op in _OPCODES}
    return dict(regs=regs, stack=stack, local=local, **counts)


def compile_one(job: tuple[str, int]) -> dict:
    """Compile spec `index` of `module_name` for sm_90 and read its cubin; never raises."""
    module_name, index = job
    out = dict(module=module_name.rsplit(".", 1)[-1], error=None)
    try:
        spec = _specs(module_name)[index]
        out.update(name=spec["name"], dtype=spec["dtype"], config=spec["config"], mma=expected_mma(spec))
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        start = time.perf_counter()
        source = ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec.get("attrs"))
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
        out["seconds"] = time.perf_counter() - start
        out["shared"] = int(compiled.metadata.shared)
        with tempfile.TemporaryDirectory(prefix="hyperkern-sm90-") as workdir:
            out.update(_resources(compiled.asm["cubin"], workdir, f"k{index}"))
    except Exception as exc:  # reported as a compile failure
        out.setdefault("name", f"{module_name}[{index}]")
        out.setdefault("dtype", "?")
        out.setdefault("config", "?")
        out.setdefault("mma", None)
        lines = traceback.format_exception_only(type(exc), exc)
        out["error"] = " ".join(" ".join(lines).split())[:400]
    return out


def problems(row: dict) -> list[str]:
    if row["error"] is not None:
        return ["compile error: " + row["error"]]
    found = []
    if row["stack"] or row["local"] or row["LDL"] or row["STL"]:
        found.append(f"spills (stack {row['stack']} B, local {row['local']} B, {row['LDL']} LDL / {row['STL']} STL)")
    if row["shared"] > SM90_MAX_SHARED:
        found.append(f"shared memory {row['shared']} B > {SM90_MAX_SHARED} B")
    if row["mma"] is not None and row[row["mma"]] == 0:
        found.append(f"GEMM without {row['mma']}")
    if row["mma"] == "HGMMA" and row["HMMA"]:
        found.append("HMMA (Ampere mma) in a Hopper GEMM build")
    return found


def table(rows: list[dict]) -> str:
    head = ("| module | kernel | dtype | config (MxNxK warps stages) | regs | stack B | LDL/STL | smem KiB "
            "| HGMMA | HMMA | DMMA | verdict |")
    lines = [head, "|" + "---|" * 12]
    for row in rows:
        if row["error"] is not None:
            lines.append(f"| {row['module']} | {row['name']} | {row['dtype']} | {row['config']} | | | | | | | | "
                         f"**compile error** |")
            continue
        bad = problems(row)
        verdict = "ok" if not bad else "**" + "; ".join(bad) + "**"
        lines.append(f"| {row['module']} | {row['name']} | {row['dtype']} | {row['config']} | {row['regs']} | "
                     f"{row['stack']} | {row['LDL']}/{row['STL']} | {row['shared'] / 1024:.1f} | {row['HGMMA']} | "
                     f"{row['HMMA']} | {row['DMMA']} | {verdict} |")
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """One line per (module, kernel, dtype): how many configs, register range, worst spill, largest
    shared memory, tensor-core instruction counts and the verdict."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["module"], row["name"], row["dtype"]), []).append(row)
    lines = ["| module | kernel | dtype | configs | regs | spills (stack B, LDL+STL) | max smem KiB | HGMMA | HMMA "
             "| DMMA | verdict |", "|" + "---|" * 11]
    for (module, name, dtype), group in groups.items():
        built = [r for r in group if r["error"] is None]
        bad = sum(1 for r in group if problems(r))
        verdict = "ok" if not bad else f"**{bad} of {len(group)} with problems**"
        if not built:
            lines.append(f"| {module} | {name} | {dtype} | {len(group)} | | | | | | | {verdict} |")
            continue
        regs = sorted(r["regs"] for r in built)
        spill = max(built, key=lambda r: (r["stack"], r["LDL"] + r["STL"]))
        counts = {op: sorted(r[op] for r in built) for op in ("HGMMA", "HMMA", "DMMA")}
        span = lambda v: f"{v[0]}" if v[0] == v[-1] else f"{v[0]}-{v[-1]}"  # noqa: E731
        lines.append(f"| {module} | {name} | {dtype} | {len(group)} | {span(regs)} | "
                     f"{spill['stack']}, {spill['LDL'] + spill['STL']} | "
                     f"{max(r['shared'] for r in built) / 1024:.1f} | {span(counts['HGMMA'])} | "
                     f"{span(counts['HMMA'])} | {span(counts['DMMA'])} | {verdict} |")
    return "\n".join(lines)


def write_results(section_body: str, path: str = RESULTS) -> None:
    """Replace (or append) this report's section of docs/benchmark-history.md, leaving other sections alone."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark history\n"
    section = f"{SECTION}\n\n{section_body.strip()}\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION):], flags=re.MULTILINE)
        end = len(text) if nxt is None else start + len(SECTION) + nxt.start()
        text = text[:start] + section + ("\n" + text[end:] if end < len(text) else "")
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on any compile failure, spill, "
                        "shared-memory overflow or missing tensor-core instruction")
    parser.add_argument("--write-results", action="store_true", help=f"update the section of {RESULTS}")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--only", default="", help="only kernels whose name contains this substring")
    args = parser.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        if "triton" in sys.modules:
            raise SystemExit("static_gpu_report: triton was imported with TRITON_INTERPRET=1; run without it")
        del os.environ["TRITON_INTERPRET"]  # the kernels must be real @triton.jit functions here
    started = time.perf_counter()
    import triton

    rows, jobs = [], []
    for module_name in kernel_modules():
        try:
            specs = _specs(module_name)
        except Exception as exc:
            rows.append(dict(module=module_name.rsplit(".", 1)[-1], name="(module import / sm90_compile_specs)",
                             dtype="?", config="?", mma=None, error=f"{type(exc).__name__}: {exc}"[:400]))
            continue
        jobs += [(module_name, i) for i, spec in enumerate(specs) if args.only in spec["name"]]
    if not jobs and not rows:
        print("static_gpu_report: no kernel specs found (no kernels/*.py defines sm90_compile_specs)")
        return 1 if args.check else 0

    if args.jobs > 1:
        with futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            rows += list(pool.map(compile_one, jobs))
    else:
        rows += [compile_one(job) for job in jobs]

    bad = [(row, problems(row)) for row in rows if problems(row)]
    elapsed = time.perf_counter() - started
    summary = (f"{len(rows)} builds, {len(bad)} with problems; target sm_90 (GPUTarget('cuda', 90, 32)), "
               f"triton {triton.__version__}, {elapsed:.0f} s on {os.cpu_count()} CPU(s) with {args.jobs} job(s)")
    report = table(rows)
    print(report)
    print()
    print(summary)
    for row, found in bad:
        print(f"PROBLEM {row['module']} {row['name']} {row['dtype']} {row['config']}: {'; '.join(found)}")

    if args.write_results:
        date = datetime.date.today().isoformat()
        problem_lines = "".join(f"- {row['module']} {row['name']} {row['dtype']} {row['config']}: "
                                f"{'; '.join(found)}\n" for row, found in bad)
        body = (f"Date: {date}. Machine: {cpu_name()}, {os.cpu_count()} CPUs, no GPU "
                f"(compile only). Command: `python -m bench.static_gpu_report --write-results` (CI runs it with "
                f"`--check`; the per-config table is printed to stdout).\n\n"
                f"{summary}. Every kernel of kernels/*.py at every autotune config it can launch with, per input "
                "dtype and layout class as each module's sm90_compile_specs() lists them, with all optional "
                "features of the variant on. One line per kernel and dtype: regs = registers per thread (range "
                "over the configs); spills = the worst config's stack bytes and LDL+STL count (must be 0, 0); "
                "smem = largest shared memory per block (H100 limit 227 KiB); HGMMA = Hopper wgmma instructions "
                "(required in bf16/fp16/tf32 GEMM builds), HMMA = Ampere mma (must be 0 there), DMMA = fp64 "
                "tensor-core mma.\n\n" + summary_table(rows) + "\n"
                + (f"\nProblems:\n\n{problem_lines}" if bad else ""))
        write_results(body)
        print(f"wrote the '{SECTION[3:]}' section of {RESULTS}")
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
