#!/usr/bin/env python3
"""Static report of the compiled SpMM kernels, side by side with a CUTLASS sparse-GEMM anchor.

No GPU is needed. Every ``.cu`` file under ``cuda/`` is compiled for sm_80 and sm_90 (and sm_90a
when a source uses Hopper-only features) with ``nvcc -cubin -Xptxas -v`` and the flags
``cuda/CMakeLists.txt`` gives the kernels; ``bench/anchors/*.cu`` (CUTLASS's ``SparseGemm`` in
fp16, 128x128x64, warp 64x64, 3 stages; headers from the ``nvidia-cutlass`` wheel) is compiled
for sm_80 in the same run. Each cubin is disassembled with ``nvdisasm`` (wheel
``nvidia-cuda-nvdisasm``) and every kernel instantiation is reported:

* resources (ptxas): registers, spill stores/loads, stack frame, static shared memory, threads per
  CTA from ``__launch_bounds__`` (``cuobjdump -elf``, EIATTR_MAX_THREADS) when declared;
* local memory: ``LDL`` / ``STL`` instructions anywhere in the kernel;
* for each *main loop*, the steady-state iteration (below): sparse MMAs (``HMMA.SP``),
  instructions executed, non-MMA instructions per MMA, barriers (``BAR.*``), global loads and
  stores with their widths, shared/L1 wavefronts per MMA.

How a main loop and its steady state are found. The SASS is split into basic blocks (labels and
control-flow instructions; ``CALL.REL.NOINC`` to a local label is a jump, a call to a ``$``
subroutine falls through and is counted in the "calls" column), dominators give the back edges,
and each back edge's natural loop is formed (loops sharing a header merged). A main loop is a loop
that contains a sparse MMA and contains no smaller loop that does. One iteration is a path from
the header, through the loop's blocks, back to the header (a nested loop without MMAs is counted
once). Of those paths the steady state executes the most MMAs; where a runtime choice inside the
loop picks between different memory operations (today's kernels choose the contiguous or the
gathered x inside the loop), each choice is its own row: paths are grouped by the set of global
memory operations they execute (e.g. {LDG.128, LDGSTS.128} vs {LDG.16, LDG.64, LDGSTS.128}),
groups whose set is contained in another group's are dropped (an iteration that skips a load is
not the steady state), and in each group the path with the most wavefronts, then the most
instructions, is reported (the busiest iteration). Predicated-off instructions count: they
occupy issue slots.

Wavefront rule (shared/L1 data path, 128 bytes per wavefront): a warp-wide ``LDS``/``STS``/
``LDG``/``STG``/``LD``/``ST``/``ATOMS`` of b bytes per thread costs max(1, 32 b / 128)
wavefronts (LDS.128 = 4, LDS.64 = 2, LDS.32 = 1, a 16-bit access 1); ``LDSM``/``STSM`` with n
8x8 matrices (``.4`` = .x4) costs n; ``LDGSTS`` (cp.async) costs its shared-memory write,
32 b / 128. That assumes every access is bank-conflict-free and coalesced, so it is a lower
bound: a gather whose 32 lanes hit 32 different lines costs more than the rule says.

Gate (``--check``): exit 1, naming the kernel, on any spill, a stack frame, any LDL/STL, or a
global load narrower than 32 bits (``LDG.E.U16``, ``.S16``, ``.U8``, ``.S8``) in any block of a
main loop. ``tests/test_sass_report.py`` runs it wherever nvcc is present.

Cubins (and their disassembly) are cached by the hash of the flags, the nvcc version and the
contents of every file under cuda/ and cpp/include (for the anchor: bench/anchors and the
nvidia-cutlass version), under ``build/sass_report`` (``--cache-dir``), so a rerun compiles only
what changed. At most two compiles run at once (``-j``).

    python bench/sass_report.py                 # table (markdown)
    python bench/sass_report.py --json out.json # and the records as JSON
    python bench/sass_report.py --check         # gate: exit 1 on a violation
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
ANCHOR_DIR = ROOT / "bench" / "anchors"
DEFAULT_ARCHS = ("sm_80", "sm_90")
ANCHOR_ARCHS = ("sm_80",)
MAX_JOBS = 2  # CI has two cores

# Sources that need the architecture-specific sm_90a target (wgmma, setmaxnreg, ...).
SM90A_MARKERS = ("wgmma", "setmaxnreg", "__CUDA_ARCH_FEAT_SM90_ALL", "sm_90a")


# ---- tools ---------------------------------------------------------------------------------------

def _site_bins() -> List[Path]:
    """bin/ folders of the nvidia-* wheels (nvdisasm, cuobjdump) in this interpreter's site."""
    out = []
    for sp in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        out += [Path(p) for p in glob.glob(os.path.join(sp, "nvidia", "*", "bin"))]
    return out


def find_tool(name: str) -> Optional[str]:
    for b in _site_bins():
        if (b / name).is_file():
            return str(b / name)
    found = shutil.which(name)
    if found:
        return found
    for cand in sorted(glob.glob(f"/usr/local/cuda*/bin/{name}")):
        return cand
    return None


def find_nvcc() -> Optional[str]:
    env = os.environ.get("CUDACXX")
    if env and Path(env).is_file():
        return env
    return shutil.which("nvcc") or next(iter(sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))), None)


def cutlass_include() -> Optional[Path]:
    try:
        import cutlass_library  # the nvidia-cutlass wheel
    except ImportError:
        return None
    inc = Path(cutlass_library.__file__).parent / "source" / "include"
    return inc if (inc / "cutlass" / "cutlass.h").is_file() else None


def _cutlass_version() -> str:
    try:
        from importlib.metadata import version
        return "nvidia-cutlass " + version("nvidia-cutlass")
    except Exception:  # not installed as a distribution: key on the header's path
        return str(cutlass_include())


def cmake_cuda_flags() -> List[str]:
    """The kernels' nvcc flags, as cuda/CMakeLists.txt gives them (so the report compiles what the
    build compiles), plus the C++ standard of the top-level CMakeLists.txt."""
    text = (ROOT / "cuda" / "CMakeLists.txt").read_text()
    m = re.search(r"target_compile_options\(vnm_cuda\s+PRIVATE\s+\$<\$<COMPILE_LANGUAGE:CUDA>:([^>]*)>", text)
    if not m:
        raise SystemExit("sass_report: no `target_compile_options(vnm_cuda PRIVATE "
                         "$<$<COMPILE_LANGUAGE:CUDA>:...>)` in cuda/CMakeLists.txt; update "
                         "cmake_cuda_flags() to read the kernels' flags")
    std = re.search(r"set\(CMAKE_CXX_STANDARD\s+(\d+)\)", (ROOT / "CMakeLists.txt").read_text())
    return [f"-std=c++{std.group(1) if std else 17}"] + m.group(1).split()


# ---- compiling, with a cache ----------------------------------------------------------------------

@dataclasses.dataclass
class Unit:
    source: Path
    arch: str
    includes: Tuple[Path, ...]
    anchor: bool = False
    hash_dirs: Tuple[Path, ...] = ()  # project folders whose files the cache key covers
    external: str = ""  # version of external headers, for the cache key


def _run(cmd: Sequence[str]) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


def _nvcc_version(nvcc: str) -> str:
    return _run([nvcc, "--version"]).stdout.strip().splitlines()[-1]


def compile_unit(u: Unit, nvcc: str, flags: List[str], cache: Path, nvcc_version: str) -> Tuple[Path, str]:
    """(cubin, ptxas log) of one source for one arch; from the cache when nothing changed."""
    inc = [f"-I{p}" for p in u.includes]
    arch_flag = f"-arch={u.arch}"
    # Everything the source can include: every file of the project folders it may read (cheaper
    # than nvcc -M and never stale), and the version of an external header package (CUTLASS).
    h = hashlib.sha256()
    h.update("\0".join([nvcc_version, arch_flag, *flags, str(u.source), u.external]).encode())
    for d in u.hash_dirs:
        for f in sorted(p for p in d.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    stem = f"{u.source.stem}-{u.arch}-{h.hexdigest()[:16]}"
    cubin, log = cache / f"{stem}.cubin", cache / f"{stem}.ptxas.txt"
    if cubin.is_file() and log.is_file():
        return cubin, log.read_text()
    tmp = cache / f"{stem}.tmp.cubin"
    cmd = [nvcc, *flags, "-Xptxas", "-v", "-cubin", arch_flag, *inc, "-o", str(tmp), str(u.source)]
    res = _run(cmd)
    if res.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    log.write_text(res.stderr)
    tmp.replace(cubin)
    return cubin, res.stderr


# ---- ptxas / cuobjdump resources -----------------------------------------------------------------

@dataclasses.dataclass
class Resources:
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0
    barriers: int = 0
    threads: Optional[int] = None


def parse_ptxas(log: str) -> Dict[str, Resources]:
    out: Dict[str, Resources] = {}
    cur = None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), Resources())
            continue
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = out.setdefault(m.group(1), Resources())
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.stack, cur.spill_stores, cur.spill_loads = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur.registers = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            cur.barriers = int(b.group(1)) if b else 0
            s = re.search(r"(\d+) bytes smem", line)
            cur.smem = int(s.group(1)) if s else 0
    return out


def max_threads(cuobjdump: Optional[str], cubin: Path) -> Dict[str, int]:
    """Threads per CTA each kernel declares with __launch_bounds__ (EIATTR_MAX_THREADS)."""
    if not cuobjdump:
        return {}
    text = _run([cuobjdump, "-elf", str(cubin)]).stdout
    out, cur = {}, None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^\.nv\.info\.(\S+)", line)
        if m:
            cur = m.group(1)
        elif cur and "EIATTR_MAX_THREADS" in line:
            for nxt in lines[i + 1:i + 4]:
                v = re.search(r"Value:\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)", nxt)
                if v:
                    x, y, z = (int(g, 16) for g in v.groups())
                    out[cur] = x * y * z
                    break
    return out


# ---- SASS: instructions, blocks, loops ------------------------------------------------------------

@dataclasses.dataclass
class Instr:
    pred: str
    op: str  # full opcode with modifiers, e.g. LDG.E.128.CONSTANT
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    @property
    def mods(self) -> List[str]:
        return self.op.split(".")[1:]

    @property
    def target(self) -> Optional[str]:
        m = re.search(r"`\(([^)]+)\)", self.args)
        return m.group(1) if m else None


_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_LABEL = re.compile(r"^([.$][\w$.]+):\s*$")
_FUNC = re.compile(r"^\s*\.text\.(\S+):\s*$")


def parse_sass(text: str) -> Dict[str, List[Tuple[str, object]]]:
    """nvdisasm text -> {function: [("label", name) | ("instr", Instr)]}."""
    funcs: Dict[str, List[Tuple[str, object]]] = {}
    cur = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        if cur is None:
            continue
        if line.lstrip().startswith(".section"):
            cur = None
            continue
        m = _LABEL.match(line.strip())
        if m:
            cur.append(("label", m.group(1)))
            continue
        m = _INSTR.match(line)
        if m:
            cur.append(("instr", Instr((m.group(1) or "").strip(), m.group(2), m.group(3))))
    return funcs


def is_sparse_mma(ins: Instr) -> bool:
    return (ins.base == "HMMA" and "SP" in ins.mods) or (ins.base == "HGMMA" and "SP" in ins.mods)


GLOBAL_OPS = {"LDG", "STG", "LDGSTS", "LD", "ST", "ATOMG", "RED", "ATOM"}
SHARED_OPS = {"LDS", "STS", "LDSM", "STSM", "ATOMS"}
NARROW = {"U8": 1, "S8": 1, "U16": 2, "S16": 2}


def access_bytes(ins: Instr) -> int:
    """Bytes per thread of a load/store (32-bit when no width modifier is given)."""
    for m in ins.mods:
        if m in NARROW:
            return NARROW[m]
        if m in ("64", "128"):
            return int(m) // 8
    return 4


def wavefronts(ins: Instr) -> float:
    """Shared/L1 wavefronts of one warp instruction (the rule in the module docstring)."""
    if ins.base in ("LDSM", "STSM"):
        n = ins.mods[-1] if ins.mods and ins.mods[-1] in ("1", "2", "4") else "1"
        return float(n)
    if ins.base in SHARED_OPS or ins.base in GLOBAL_OPS:
        return max(1.0, 32 * access_bytes(ins) / 128)
    return 0.0


def mem_kind(ins: Instr) -> Optional[str]:
    """'LDG.16', 'LDGSTS.128', ... for a global-memory access, else None."""
    if ins.base not in GLOBAL_OPS:
        return None
    return f"{ins.base}.{8 * access_bytes(ins)}"


def is_narrow_global_load(ins: Instr) -> bool:
    return ins.base in ("LDG", "LD") and access_bytes(ins) < 4


@dataclasses.dataclass
class Block:
    label: Optional[str]
    instrs: List[Instr]
    succ: List[int] = dataclasses.field(default_factory=list)
    calls: int = 0

    @property
    def mma(self) -> int:
        return sum(is_sparse_mma(i) for i in self.instrs)

    @property
    def wf(self) -> float:
        return sum(wavefronts(i) for i in self.instrs)

    @property
    def kinds(self) -> Counter:
        return Counter(k for k in (mem_kind(i) for i in self.instrs) if k)


def _unconditional(ins: Instr) -> bool:
    return ins.pred in ("", "@PT")


def build_cfg(items: List[Tuple[str, object]]) -> List[Block]:
    blocks: List[Block] = []
    cur = Block(None, [])
    for kind, val in items:
        if kind == "label":
            if cur.instrs or cur.label is not None:
                blocks.append(cur)
            cur = Block(val, [])  # type: ignore[arg-type]
            continue
        ins: Instr = val  # type: ignore[assignment]
        cur.instrs.append(ins)
        if ins.base in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "CALL", "KILL", "BPT"):
            blocks.append(cur)
            cur = Block(None, [])
    if cur.instrs or cur.label is not None:
        blocks.append(cur)
    by_label = {b.label: i for i, b in enumerate(blocks) if b.label}
    for i, b in enumerate(blocks):
        last = b.instrs[-1] if b.instrs else None
        nxt = [i + 1] if i + 1 < len(blocks) else []
        if last is None:
            b.succ = nxt
            continue
        tgt = last.target
        if last.base in ("BRA", "JMP"):
            t = [by_label[tgt]] if tgt in by_label else []
            b.succ = t if _unconditional(last) else t + nxt
            if last.pred == "@!PT":
                b.succ = nxt
        elif last.base == "CALL":
            if tgt and tgt.startswith(".L") and tgt in by_label:  # a jump spelled as a call
                b.succ = [by_label[tgt]] + ([] if _unconditional(last) else nxt)
            else:  # a subroutine: it returns here
                b.calls += 1
                b.succ = nxt
        elif last.base in ("EXIT", "RET", "KILL"):
            b.succ = [] if _unconditional(last) else nxt
        elif last.base in ("BRX", "JMX"):
            b.succ = nxt  # indirect: unknown targets (none in these kernels)
        else:
            b.succ = nxt
        b.succ = list(dict.fromkeys(b.succ))
    return blocks


def dominators(blocks: List[Block]) -> Tuple[List[int], Dict[int, set]]:
    """(reachable blocks in reverse post-order, dominator sets)."""
    order, seen = [], set()
    stack = [(0, iter(blocks[0].succ))] if blocks else []
    seen.add(0)
    while stack:
        n, it = stack[-1]
        for s in it:
            if s not in seen:
                seen.add(s)
                stack.append((s, iter(blocks[s].succ)))
                break
        else:
            order.append(n)
            stack.pop()
    rpo = order[::-1]
    preds: Dict[int, List[int]] = {n: [] for n in rpo}
    for n in rpo:
        for s in blocks[n].succ:
            if s in preds:
                preds[s].append(n)
    allset = set(rpo)
    dom = {n: set(allset) for n in rpo}
    if rpo:
        dom[rpo[0]] = {rpo[0]}
    changed = True
    while changed:
        changed = False
        for n in rpo[1:]:
            ps = [dom[p] for p in preds[n]]
            new = set.intersection(*ps) | {n} if ps else {n}
            if new != dom[n]:
                dom[n], changed = new, True
    return rpo, dom


def natural_loops(blocks: List[Block]) -> Dict[int, set]:
    rpo, dom = dominators(blocks)
    preds: Dict[int, List[int]] = {n: [] for n in rpo}
    for n in rpo:
        for s in blocks[n].succ:
            if s in preds:
                preds[s].append(n)
    loops: Dict[int, set] = {}
    for u in rpo:
        for h in blocks[u].succ:
            if h in dom and h in dom[u]:  # back edge u -> h
                body, work = {h, u}, [u]
                while work:
                    x = work.pop()
                    if x == h:
                        continue
                    for p in preds[x]:
                        if p not in body:
                            body.add(p)
                            work.append(p)
                loops.setdefault(h, set()).update(body)
    return loops


@dataclasses.dataclass
class LoopPath:
    header: str
    blocks: List[str]
    mma: int
    instructions: int
    wavefronts: float
    barriers: int
    calls: int
    global_ops: Dict[str, int]
    shared_ops: Dict[str, int]
    narrow_global_loads_in_loop: int
    # cp.async groups the loop keeps in flight while it waits (DEPBAR.LE SB0, n: n + 1), 0 if none
    cp_async_groups_in_flight: int
    sass: List[str]  # the path's instructions, for --explain

    @property
    def non_mma_per_mma(self) -> float:
        return (self.instructions - self.mma) / self.mma if self.mma else float("nan")

    @property
    def wavefronts_per_mma(self) -> float:
        return self.wavefronts / self.mma if self.mma else float("nan")


Sig = Tuple[Tuple[str, int], ...]  # a multiset of global-memory operations, as sorted items
MAX_SIGS = 256  # per block; more distinct multisets than this keeps the busiest


def _add(sig: Sig, c: Counter) -> Sig:
    return tuple(sorted((Counter(dict(sig)) + c).items()))


def _contained(a: Sig, b: Sig) -> bool:
    """Multiset a < b: b does every operation a does, and more."""
    da, db = dict(a), dict(b)
    return a != b and all(db.get(k, 0) >= n for k, n in da.items())


def main_loops(blocks: List[Block]) -> List[List[LoopPath]]:
    """For each main loop, its steady-state paths (one per memory-operation group)."""
    loops = natural_loops(blocks)
    mma_loops = {h: b for h, b in loops.items() if any(blocks[n].mma for n in b)}
    inner = {h: b for h, b in mma_loops.items()
             if not any(h2 != h and b2 < b for h2, b2 in mma_loops.items())}
    sys.setrecursionlimit(max(10000, 4 * len(blocks)))
    out = []
    for h, body in sorted(inner.items()):
        # Edges into the header end an iteration; back edges of nested loops are not followed.
        nested = {h2 for h2, b2 in loops.items() if h2 != h and b2 < body}
        nested_back = {(u, h2) for h2 in nested for u in loops[h2] if h2 in blocks[u].succ}
        # memo[n][sig] = (mma, wavefronts, instructions, next block, next sig): the busiest path
        # from n back to the header doing exactly the global operations `sig`.
        memo: Dict[int, Dict[Sig, Tuple[int, float, int, Optional[int], Sig]]] = {}

        def best(n: int, onstack: FrozenSet[int]) -> Dict[Sig, Tuple[int, float, int, Optional[int], Sig]]:
            if n in memo:
                return memo[n]
            b = blocks[n]
            kinds = b.kinds
            res: Dict[Sig, Tuple[int, float, int, Optional[int], Sig]] = {}
            for s in b.succ:
                if s == h:
                    cands = {(): (0, 0.0, 0, None, ())}
                elif s in body and (n, s) not in nested_back and s not in onstack:
                    cands = best(s, onstack | {n})
                else:
                    continue  # leaves the loop: not an iteration
                for sig, (m, w, c, _, _) in cands.items():
                    key = _add(sig, kinds)
                    val = (m + b.mma, w + b.wf, c + len(b.instrs), s, sig)
                    if key not in res or val[:3] > res[key][:3]:
                        res[key] = val
            if len(res) > MAX_SIGS:
                res = dict(sorted(res.items(), key=lambda kv: kv[1][:3], reverse=True)[:MAX_SIGS])
            memo[n] = res
            return res

        paths = best(h, frozenset())
        if not paths:
            continue
        top = max(v[0] for v in paths.values())
        groups = {k: v for k, v in paths.items() if v[0] == top}
        groups = {k: v for k, v in groups.items() if not any(_contained(k, k2) for k2 in groups)}
        narrow = sum(is_narrow_global_load(i) for n in body for i in blocks[n].instrs)
        rows = []
        for sig, _ in sorted(groups.items(), key=lambda kv: (kv[1][2], kv[0])):
            seq, n, want = [], h, sig
            while n is not None:
                seq.append(n)
                _, _, _, nxt, nsig = memo[n][want]
                n, want = (None if nxt is None or nxt == h else nxt), nsig
            ins = [i for n in seq for i in blocks[n].instrs]
            rows.append(LoopPath(
                header=blocks[h].label or f"block{h}",
                blocks=[blocks[n].label or f"block{n}" for n in seq],
                mma=sum(is_sparse_mma(i) for i in ins),
                instructions=len(ins),
                wavefronts=sum(wavefronts(i) for i in ins),
                barriers=sum(i.base == "BAR" for i in ins),
                calls=sum(blocks[n].calls for n in seq),
                global_ops=dict(sig),
                shared_ops=dict(Counter(f"{i.base}.{8 * access_bytes(i)}" if i.base not in ("LDSM", "STSM")
                                        else f"{i.base}.x{i.mods[-1]}" for i in ins if i.base in SHARED_OPS)),
                narrow_global_loads_in_loop=narrow,
                cp_async_groups_in_flight=max((int(m.group(1), 0) + 1 for i in ins if i.base == "DEPBAR"
                                               for m in [re.search(r"SB0,\s*(0x[0-9a-f]+|\d+)", i.args)] if m),
                                              default=0),
                sass=[f"{i.pred + ' ' if i.pred else ''}{i.op} {i.args}".strip() for i in ins],
            ))
        out.append(rows)
    return out


# ---- report --------------------------------------------------------------------------------------

@dataclasses.dataclass
class KernelReport:
    source: str
    arch: str
    kernel: str  # demangled, shortened
    mangled: str
    anchor: bool
    resources: Resources
    local_memory_instructions: int
    loops: List[List[LoopPath]]

    def violations(self) -> List[str]:
        v = []
        r = self.resources
        if r.spill_stores or r.spill_loads:
            v.append(f"spills ({r.spill_stores} B stores, {r.spill_loads} B loads)")
        if r.stack:
            v.append(f"stack frame of {r.stack} B")
        if self.local_memory_instructions:
            v.append(f"{self.local_memory_instructions} local-memory instructions (LDL/STL)")
        narrow = max((p.narrow_global_loads_in_loop for rows in self.loops for p in rows), default=0)
        if narrow:
            v.append(f"{narrow} global loads narrower than 32 bits (e.g. LDG.E.U16) in a main loop")
        return v


def demangle(names: List[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt") or find_tool("cu++filt")
    if not tool or not names:
        return {n: n for n in names}
    res = _run([tool, *names]).stdout.splitlines()
    return dict(zip(names, res)) if len(res) == len(names) else {n: n for n in names}


def short_name(name: str, anchor_label: Optional[str]) -> str:
    if anchor_label:
        return anchor_label
    s = re.sub(r"^void ", "", name).replace("(anonymous namespace)::", "")
    s = re.sub(r"\b[A-Za-z_]\w*::", "", s)
    if s.endswith(")"):  # drop the parameter list: from the '(' matching the last ')'
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(s[i], 0)
            if depth == 0:
                s = s[:i]
                break
    return s.replace(" ", "")


ANCHOR_LABELS = {
    "cutlass_sparse_gemm_f16": "CUTLASS SparseGemm f16 128x128x64 w64x64 3st",
}


def disassemble(cubin: Path, nvdisasm: str, cuobjdump: Optional[str]) -> Tuple[str, Dict[str, int]]:
    """(nvdisasm text, threads per kernel), cached beside the cubin (nvdisasm is not fast)."""
    sass_file, threads_file = cubin.with_suffix(".sass"), cubin.with_suffix(".threads.json")
    if sass_file.is_file() and threads_file.is_file():
        return sass_file.read_text(), json.loads(threads_file.read_text())
    res = _run([nvdisasm, "-c", str(cubin)])
    if res.returncode:
        raise RuntimeError(f"nvdisasm {cubin} failed:\n{res.stderr}")
    threads = max_threads(cuobjdump, cubin)
    threads_file.write_text(json.dumps(threads))
    sass_file.write_text(res.stdout)
    return res.stdout, threads


def analyse(unit: Unit, log: str, sass: str, threads: Dict[str, int]) -> List[KernelReport]:
    funcs = parse_sass(sass)
    ptx = parse_ptxas(log)
    kernels = [f for f in funcs if f in ptx]
    names = demangle(kernels)
    out = []
    for f in kernels:
        items = funcs[f]
        blocks = build_cfg(items)
        r = ptx[f]
        r.threads = threads.get(f)
        local = sum(1 for k, i in items if k == "instr" and i.base in ("LDL", "STL"))  # type: ignore[union-attr]
        label = ANCHOR_LABELS.get(unit.source.stem, unit.source.stem) if unit.anchor else None
        out.append(KernelReport(str(unit.source.relative_to(ROOT)), unit.arch, short_name(names[f], label),
                                f, unit.anchor, r, local, main_loops(blocks)))
    return out


def discover(archs: Sequence[str], with_anchor: bool) -> List[Unit]:
    cuda_dir = ROOT / "cuda"
    srcs = sorted(p for p in cuda_dir.rglob("*.cu"))
    text = "\n".join(p.read_text(errors="replace") for p in cuda_dir.rglob("*") if p.is_file()
                     and p.suffix in (".cu", ".cuh", ".h", ".txt"))
    code = re.sub(r"//[^\n]*|/\*.*?\*/|#[^\n]*", "", text, flags=re.S)  # comments and CMake/# lines
    archs = list(archs)
    wants_90a = any(m in code for m in SM90A_MARKERS) or re.search(r"\b90a\b", text) is not None
    if wants_90a and "sm_90a" not in archs:
        archs.append("sm_90a")
    inc = (ROOT / "cpp" / "include", ROOT / "cuda" / "include", ROOT / "cuda" / "src")
    units = [Unit(s, a, inc, hash_dirs=(cuda_dir, ROOT / "cpp" / "include")) for s in srcs for a in archs]
    if with_anchor:
        cut = cutlass_include()
        if cut is None:
            raise SystemExit("sass_report: the CUTLASS anchor needs the nvidia-cutlass wheel "
                             "(pip install nvidia-cutlass), or pass --no-anchor")
        units += [Unit(s, a, (cut,), anchor=True, hash_dirs=(ANCHOR_DIR,), external=_cutlass_version())
                  for s in sorted(ANCHOR_DIR.glob("*.cu")) for a in ANCHOR_ARCHS]
    return units


def run(archs: Sequence[str] = DEFAULT_ARCHS, with_anchor: bool = True, jobs: int = MAX_JOBS,
        cache_dir: Optional[Path] = None, progress: bool = True) -> List[KernelReport]:
    nvcc = find_nvcc()
    if not nvcc:
        raise SystemExit("sass_report: nvcc not found (put the CUDA toolkit's bin on PATH or set CUDACXX)")
    nvdisasm = find_tool("nvdisasm")
    if not nvdisasm:
        raise SystemExit("sass_report: nvdisasm not found: pip install nvidia-cuda-nvdisasm")
    cuobjdump = find_tool("cuobjdump")
    cache = Path(cache_dir or os.environ.get("VNM_SASS_CACHE") or ROOT / "build" / "sass_report")
    cache.mkdir(parents=True, exist_ok=True)
    flags = cmake_cuda_flags()
    version = _nvcc_version(nvcc)
    units = discover(archs, with_anchor)
    jobs = max(1, min(jobs, MAX_JOBS))
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(units), desc="compile", unit="cubin", file=sys.stderr)
        except ImportError:
            pass
    # The slow anchor first, so two compiles overlap it.
    order = sorted(units, key=lambda u: not u.anchor)
    def work(u: Unit) -> Tuple[str, str, Dict[str, int]]:
        cubin, log = compile_unit(u, nvcc, flags, cache, version)
        return (log, *disassemble(cubin, nvdisasm, cuobjdump))

    results: Dict[int, Tuple[str, str, Dict[str, int]]] = {}
    with futures.ThreadPoolExecutor(max_workers=jobs) as ex:
        futs = {ex.submit(work, u): id(u) for u in order}
        for fut in futures.as_completed(futs):
            results[futs[fut]] = fut.result()
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    reports: List[KernelReport] = []
    for u in units:
        reports += analyse(u, *results[id(u)])
    return reports


def _fmt(x: float, nd: int = 1) -> str:
    return "-" if x != x else f"{x:.{nd}f}"


def table(reports: List[KernelReport]) -> str:
    head = ("| kernel | arch | regs | spill st/ld B | stack B | smem B | threads | LDL/STL | loop path (global ops) "
            "| MMA/iter | instr/iter | non-MMA/MMA | wavefronts/MMA | BAR/iter | calls |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for k in reports:
        r = k.resources
        base = (f"| {k.kernel} | {k.arch} | {r.registers} | {r.spill_stores}/{r.spill_loads} | {r.stack} | "
                f"{r.smem if r.smem or not k.anchor else 'dynamic'} | {r.threads or '-'} | {k.local_memory_instructions} |")
        rows = [p for loop in k.loops for p in loop]
        if not rows:
            lines.append(base + " no MMA loop | | | | | | |")
        for p in rows:
            ops = ", ".join(f"{n}x {op}" for op, n in sorted(p.global_ops.items()))
            lines.append(base + f" {ops or '-'} | {p.mma} | {p.instructions} | {_fmt(p.non_mma_per_mma)} | "
                         f"{_fmt(p.wavefronts_per_mma, 2)} | {p.barriers} | {p.calls} |")
    return "\n".join(lines)


def to_json(reports: List[KernelReport]) -> list:
    out = []
    for k in reports:
        d = dataclasses.asdict(k)
        for loop_d, loop in zip(d["loops"], k.loops):
            for p_d, p in zip(loop_d, loop):
                p_d.pop("sass")
                p_d["non_mma_per_mma"] = p.non_mma_per_mma
                p_d["wavefronts_per_mma"] = p.wavefronts_per_mma
        d["violations"] = k.violations()
        out.append(d)
    return out


def explain(reports: List[KernelReport], needle: str) -> str:
    """The SASS of each steady-state path of the kernels whose name contains `needle`."""
    out = []
    for k in reports:
        if needle not in k.kernel:
            continue
        for li, loop in enumerate(k.loops):
            for p in loop:
                out.append(f"## {k.kernel} [{k.arch}] loop {li} ({p.header}), global ops "
                           f"{p.global_ops}: {p.instructions} instructions, {p.mma} MMA, blocks "
                           f"{' '.join(p.blocks)}")
                out += [f"    {line}" for line in p.sass]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", help="sm_XX (repeatable; default sm_80 and sm_90)")
    ap.add_argument("--no-anchor", action="store_true", help="skip the CUTLASS anchor")
    ap.add_argument("--json", metavar="PATH", help="also write the records as JSON ('-' for stdout)")
    ap.add_argument("--check", action="store_true",
                    help="gate: exit 1 on spills, stack, LDL/STL or a <32-bit global load in a main loop")
    ap.add_argument("-j", "--jobs", type=int, default=MAX_JOBS, help=f"parallel compiles (at most {MAX_JOBS})")
    ap.add_argument("--cache-dir", type=Path, help="cubin cache (default build/sass_report)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--explain", metavar="NAME", help="print the SASS of the steady-state paths of "
                    "the kernels whose short name contains NAME")
    a = ap.parse_args(argv)
    reports = run(a.arch or DEFAULT_ARCHS, not a.no_anchor, a.jobs, a.cache_dir, not a.quiet)
    if a.explain:
        print(explain(reports, a.explain))
        return 0
    if a.json == "-":
        json.dump(to_json(reports), sys.stdout, indent=1)
    else:
        print(table(reports))
        if a.json:
            Path(a.json).write_text(json.dumps(to_json(reports), indent=1))
    if a.check:
        bad = [(k, v) for k in reports if not k.anchor for v in k.violations()]
        for k, v in bad:
            print(f"SASS GATE FAIL: {k.kernel} [{k.arch}] ({k.source}): {v}", file=sys.stderr)
        if bad:
            return 1
        print(f"SASS gate passed: {sum(not k.anchor for k in reports)} kernel instantiations", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
