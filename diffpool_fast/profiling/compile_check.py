"""Compile every Triton kernel ahead of time, without a GPU.

Each kernel is compiled with ``triton.compile`` for every block configuration its launch helper
can pick (the helpers' tables), crossed with the dtype, precision (bf16 parts) and flag
specialisations that change its code, with and without 16-divisible strides (``div16``: how
triton's launcher specialises them when N is a multiple of 16), for sm_80 (A100) and sm_90
(H100/H200). For each compiled kernel the table shows registers a thread (under the ``maxnreg``
cap the launches pass), spilled bytes (``ptxas -v`` on the generated PTX, with the ptxas triton
uses), the dynamic shared memory triton allocates, and the tensor-core instructions of its SASS
(``cuobjdump --dump-sass``): HGMMA (Hopper's warp-group products, sm_90) and HMMA (mma.sync).
Exit status 1 on a compile error, any spill, shared memory above the target's per-block limit,
or a product kernel with neither (its dots fell back to FMA).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, NamedTuple, Optional

from ..config import triton_importable, triton_interpreting
from ..errors import UsageError

#: Maximum shared memory per thread block (CUDA C Programming Guide, compute capability table):
#: 163 KB on 8.0 (A100), 227 KB on 9.0 (H100).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TARGETS = (80, 90)
_TL = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "u8": "*u8"}


class Variant(NamedTuple):
    kernel: str
    label: str  # the configuration and specialisation, human readable
    args: Dict[str, object]  # argument -> triton type string, or a constexpr value
    num_warps: int
    num_stages: int
    # strides divisible by 16, as triton's launcher marks them when N (and F, C) are multiples
    # of 16: vectorised loads, a different register allocation, so both forms are checked
    aligned: bool = False


def _row_variants(full: bool) -> List[Variant]:
    from ..kernels.assignment import row_configs

    out = []
    for c_pad, cfg, bcfg in row_configs():
        for parts in (3, 2) if full else (3,):
            for ldt in ("fp32", "bf16", "fp16") if full else ("fp32",):
                for has_mask, has_nc in ((True, False), (False, False), (True, True), (False, True)):
                    args = {
                        "logit_ptr": _TL[ldt], "mask_ptr": "*u8" if has_mask else "*fp32",
                        "nc_ptr": "*i32" if has_nc else "*fp32",
                        "S_ptr": "*fp32", "Sp_ptr": "*bf16", "work_ptr": "*fp32",
                        "N": "i32", "C": "i32", "W": "i32", "col_ent": "i32", "col_cnt": "i32", "plane": "i32",
                        "stride_lb": "i32", "stride_ln": "i32", "stride_lc": 1, "stride_mb": "i32",
                        "HAS_MASK": has_mask, "HAS_NC": has_nc, "BLOCK_N": cfg.block_n, "C_PAD": c_pad,
                        "PARTS": parts,
                    }
                    label = (f"C_PAD={c_pad} BN={cfg.block_n} w{cfg.num_warps} P{parts} s={ldt} "
                             f"mask={int(has_mask)} nc={int(has_nc)}")
                    out.append(Variant("assignment_fwd_kernel", label, args, cfg.num_warps, cfg.num_stages))
            flag_sets = ((True, True), (True, False), (False, True)) if full else ((True, True),)
            for dt in ("fp32", "bf16", "fp16") if full else ("fp32",):
                for need_dl, need_dx in flag_sets if dt == "fp32" else flag_sets[:1]:
                    args = {
                        "x_ptr": _TL[dt], "S_ptr": "*fp32", "AS_ptr": "*fp32", "AtS_ptr": "*fp32", "D_ptr": "*fp32",
                        "asym_ptr": "*i32", "mask_ptr": "*u8", "StS_ptr": "*fp32",
                        "g_out_ptr": "*fp32", "G_ptr": "*fp32", "fin_ptr": "*fp64", "aux_ptr": "*fp64",
                        "gq_ptr": "*fp64", "gent_ptr": "*fp64", "glink_ptr": "*fp32", "gentl_ptr": "*fp32",
                        "dL_ptr": _TL[dt] if need_dl else "*fp32", "dX_ptr": _TL[dt], "dP_ptr": "*fp32",
                        "B": "i32", "N": "i32", "C": "i32", "F": "i32",
                        "sg_q": "i32", "sg_e": "i32", "sg_l": "i32", "sg_el": "i32",
                        "stride_xb": "i32", "stride_xn": "i32", "stride_xf": 1, "stride_mb": "i32",
                        "stride_gob": "i32", "stride_goc": "i32", "stride_gof": 1,
                        "stride_Gb": "i32", "stride_Gr": "i32", "stride_Gc": 1,
                        "stride_dlb": "i32", "stride_dln": "i32", "stride_dlc": 1,
                        "stride_dxb": "i32", "stride_dxn": "i32", "stride_dxf": 1,
                        "HAS_MASK": True, "NEED_DL": need_dl, "NEED_DX": need_dx, "HAS_D": True,
                        "HAS_GOUT": True, "HAS_G": True, "HAS_GQ": True, "HAS_GENT": True,
                        "HAS_GLINK": True, "HAS_GENTL": True, "MODE": 0, "PER_GRAPH": False,
                        "BLOCK_N": bcfg.block_n, "BLOCK_K": bcfg.block_k, "BLOCK_C": bcfg.block_c,
                        "C_PAD": c_pad, "PARTS": parts,
                    }
                    label = (f"C_PAD={c_pad} BN={bcfg.block_n} BK={bcfg.block_k} BC={bcfg.block_c} "
                             f"w{bcfg.num_warps} s{bcfg.num_stages} P{parts} x,s={dt} dL={int(need_dl)} "
                             f"dX={int(need_dx)}")
                    out.append(Variant("assignment_bwd_kernel", label, args, bcfg.num_warps, bcfg.num_stages))
    return out


def _gram_variants(full: bool) -> List[Variant]:
    from ..kernels.gram import gram_configs

    out = []
    for c_pad, cfg in gram_configs():
        for parts in (3, 2) if full else (3,):
            for ydt in ("fp32", "bf16", "fp16") if full else ("fp32",):
                args = {
                    "x_ptr": _TL[ydt], "Sp_ptr": "*bf16", "AS_ptr": "*fp32", "out_ptr": "*fp32",
                    "out_adj_ptr": "*fp32", "StS_ptr": "*fp32", "work_ptr": "*fp32",
                    "N": "i32", "C": "i32", "F": "i32", "W": "i32", "c_tr": "i32", "c_sts": "i32",
                    "c_asym": "i32", "n_adj": "i32", "plane": "i32", "n_ft": "i32",
                    "stride_xb": "i32", "stride_xn": "i32", "stride_xf": 1,
                    "BLOCK_C": cfg.block_c, "BLOCK_F": cfg.block_f, "BLOCK_N": cfg.block_n, "C_PAD": c_pad,
                    "PARTS": parts, "ADJ_PAD": 16, "SYM_TILE": cfg.block_c == c_pad,
                }
                label = (f"C_PAD={c_pad} BC={cfg.block_c} BF={cfg.block_f} BN={cfg.block_n} w{cfg.num_warps} "
                         f"s{cfg.num_stages} P{parts} X={ydt}")
                out.append(Variant("gram_fwd_kernel", label, args, cfg.num_warps, cfg.num_stages))
    out.append(Variant("symmetrize_kernel", "BC=64", {
        "out_adj_ptr": "*fp32", "work_ptr": "*fp32", "C": "i32", "W": "i32", "c_asym": "i32",
        "n_adj": "i32", "BLOCK_C": 64, "ADJ_PAD": 16}, 4, 1))
    out.append(Variant("finish_kernel", "graph mode, per graph", {
        "work_ptr": "*fp32", "q_ptr": "*fp64", "ent_ptr": "*fp64", "fin_ptr": "*fp64", "asym_ptr": "*i32",
        "link_ptr": "*fp32", "entl_ptr": "*fp32", "aux_ptr": "*fp64", "B": "i32", "N": "i32", "W": "i32",
        **{k: "i32" for k in ("c_ent", "c_cnt", "n_row", "c_sq", "c_pad", "c_asym", "n_adj", "c_tr", "n_tr",
                              "c_sts", "n_sts", "c_q", "n_q", "c_flag")},
        "MODE": 2, "PER_GRAPH": True, "EXACT": True, "PAD_SQ": True, "BLOCK_B": 16, "ROW_PAD": 64,
        "ADJ_PAD": 64, "TR_PAD": 4, "STS_PAD": 16, "Q_PAD": 64}, 4, 1))
    return out


def _adjacency_variants(full: bool) -> List[Variant]:
    from ..kernels.adjacency import (
        _RESIDUAL_BWD_TABLE,
        _RESIDUAL_TABLE,
        adjacency_configs,
        adjacency_grad_configs,
    )

    out = []
    # (mode, FWD_TERMS, CHECK_SYM, SKIP_SYMMETRIC, S_FP32)
    modes = (("fwd", True, False, False, False), ("fwd+sym", True, True, False, False),
             ("AtS", False, False, True, True))
    for c_pad, cfg in adjacency_configs():
        for parts in (3, 2) if full else (3,):
            for adt in ("fp32", "fp16", "bf16", "u8") if full else ("fp32", "u8"):
                for mode, terms, check, skip, s32 in modes:
                    args = {
                        "adj_ptr": _TL[adt], "Sp_ptr": "*fp32" if s32 else "*bf16", "AS_ptr": "*fp32",
                        "work_ptr": "*fp32", "mask_ptr": "*u8", "asym_ptr": "*i32",
                        "N": "i32", "W": "i32", "c_sq": "i32", "c_pad": "i32", "c_asym": "i32", "plane": "i32",
                        "stride_ab": "i32",
                        # A^T S swaps the strides: the row stride is then the unit one.
                        "stride_ar": 1 if skip else "i32", "stride_ac": "i32" if skip else 1, "stride_mb": "i32",
                        "FWD_TERMS": terms, "CHECK_SYM": check, "ASYM_DEFAULT": 0, "SKIP_SYMMETRIC": skip,
                        "PAD_SQ": terms, "A_EXACT": adt in ("u8", "bf16"), "S_FP32": s32,
                        "BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k, "BLOCK_C": cfg.block_c, "C_PAD": c_pad,
                        "PARTS": parts,
                    }
                    label = (f"C_PAD={c_pad} BM={cfg.block_m} BK={cfg.block_k} BC={cfg.block_c} w{cfg.num_warps} "
                             f"s{cfg.num_stages} P{parts} A={adt} {mode}")
                    out.append(Variant("adjacency_fwd_kernel", label, args, cfg.num_warps, cfg.num_stages))
    for table, kernel in ((_RESIDUAL_TABLE, "link_residual_kernel"), (_RESIDUAL_BWD_TABLE, "link_residual_bwd_kernel")):
        for c_pad, cfg in adjacency_configs(table):
            for parts in (3, 2) if full else (3,):
                for adt in ("fp32", "fp16", "bf16", "u8") if full else ("fp32",):
                    if kernel == "link_residual_kernel":
                        args = {
                            "adj_ptr": _TL[adt], "Sp_ptr": "*bf16", "work_ptr": "*fp32",
                            **{k: "i32" for k in ("N", "W", "c_sq", "n_adj", "c_tr", "n_tr", "c_sts", "n_sts", "c_q",
                                                  "c_flag", "plane")},
                            "rho": "fp32", "stride_ab": "i32", "stride_ar": "i32", "stride_ac": 1,
                            "ADJ_PAD": 64, "TR_PAD": 4, "STS_PAD": 16,
                        }
                    else:
                        args = {
                            "adj_ptr": _TL[adt], "S_ptr": "*fp32", "fin_ptr": "*fp64", "asym_ptr": "*i32",
                            "D_ptr": "*fp32", "N": "i32", "stride_ab": "i32", "stride_ar": "i32", "stride_ac": 1,
                        }
                    args.update({"BLOCK_M": cfg.block_m, "BLOCK_K": cfg.block_k, "BLOCK_C": cfg.block_c,
                                 "C_PAD": c_pad, "PARTS": parts})
                    label = (f"C_PAD={c_pad} BM={cfg.block_m} BK={cfg.block_k} BC={cfg.block_c} w{cfg.num_warps} "
                             f"s{cfg.num_stages} P{parts} A={adt}")
                    out.append(Variant(kernel, label, args, cfg.num_warps, cfg.num_stages))
    for cfg in adjacency_grad_configs():
        for c_pad in (16, 128, 512) if full else (128,):
            for adt in ("fp32", "fp16", "bf16") if full else ("fp32",):
                args = {
                    "adj_ptr": _TL[adt], "W_ptr": "*fp32", "S_ptr": "*fp32", "mask_ptr": "*u8",
                    "fin_ptr": "*fp64", "aux_ptr": "*fp64", "gq_ptr": "*fp64", "gent_ptr": "*fp64",
                    "glink_ptr": "*fp32", "gentl_ptr": "*fp32", "dA_ptr": _TL[adt],
                    "B": "i32", "N": "i32", "C": "i32",
                    "sg_q": "i32", "sg_e": "i32", "sg_l": "i32", "sg_el": "i32",
                    "stride_ab": "i32", "stride_ar": "i32", "stride_ac": 1,
                    "stride_wb": "i32", "stride_wn": "i32", "stride_wc": 1, "stride_mb": "i32",
                    "stride_db": "i32", "stride_dr": "i32", "stride_dc": 1,
                    "HAS_MASK": True, "HAS_GQ": True, "HAS_GENT": True, "HAS_GLINK": True, "HAS_GENTL": True,
                    "MODE": 2, "PER_GRAPH": False,
                    "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "C_PAD": c_pad,
                    "PARTS": 3,
                }
                label = (f"C_PAD={c_pad} BM={cfg.block_m} BN={cfg.block_n} BK={cfg.block_k} w{cfg.num_warps} "
                         f"s{cfg.num_stages} A={adt}")
                out.append(Variant("adjacency_bwd_kernel", label, args, cfg.num_warps, cfg.num_stages))
    return out


def all_variants(full: bool = True) -> List[Variant]:
    """Every variant the check compiles; ``full=False`` keeps fp32 (and uint8 adj) only."""
    seen, out = set(), []
    for v in _row_variants(full) + _gram_variants(full) + _adjacency_variants(full):
        if (v.kernel, v.label) not in seen:  # N buckets can map to one configuration
            seen.add((v.kernel, v.label))
            out.append(v)
    return _both_alignments(out)


def _both_alignments(variants: List[Variant]) -> List[Variant]:
    out = []
    for v in variants:
        out.append(v)
        out.append(v._replace(label=v.label + " div16", aligned=True))
    return out


def representative_variants() -> List[Variant]:
    """A small subset for CI: per kernel, its smallest fp32 configuration and, with every
    optional branch switched on (mask, both gradients, the symmetry check), the C_PAD = 128
    one (the benchmark shape) and the largest; plus the uint8-adjacency forward at C_PAD = 512."""
    quick = [v for v in all_variants(full=False) if not v.aligned]
    heavy = ("mask=1", "dL=1 dX=1", "fwd+sym")
    picked: List[Variant] = []
    for kernel in dict.fromkeys(v.kernel for v in quick):
        mine = [v for v in quick if v.kernel == kernel and "u8" not in v.label]
        loaded = [v for v in mine if any(h in v.label for h in heavy)] or mine
        mid = [v for v in loaded if "C_PAD=128 " in v.label]
        for v in [mine[0]] + mid[-1:] + [loaded[-1]]:
            if v not in picked:
                picked.append(v)
    u8 = [v for v in quick if v.kernel == "adjacency_fwd_kernel" and "A=u8 fwd+sym" in v.label]
    picked.append(u8[-1])
    return _both_alignments(picked)


def _kernel_fn(name: str):
    from ..kernels import adjacency, assignment, finish, gram

    for mod in (assignment, gram, adjacency, finish):
        if hasattr(mod, name):
            return getattr(mod, name)
    raise KeyError(name)


#: kernels whose products must run on tensor cores: a compile whose SASS has neither HGMMA
#: (Hopper's warp-group products) nor HMMA (mma.sync) fell back to FMA and fails the check
TENSOR_CORE_KERNELS = ("assignment_bwd_kernel", "gram_fwd_kernel", "adjacency_fwd_kernel",
                       "link_residual_kernel", "link_residual_bwd_kernel", "adjacency_bwd_kernel")


class Result(NamedTuple):
    kernel: str
    label: str
    target: int
    registers: Optional[int]
    spill_bytes: Optional[int]
    shared: Optional[int]
    error: Optional[str]
    hgmma: Optional[int] = None  # HGMMA instructions in the SASS (sm_90 warp-group products)
    hmma: Optional[int] = None  # HMMA instructions (mma.sync)

    @property
    def fma_fallback(self) -> bool:
        return (self.kernel in TENSOR_CORE_KERNELS and self.error is None
                and not (self.hgmma or 0) and not (self.hmma or 0))

    @property
    def ok(self) -> bool:
        return (self.error is None and self.spill_bytes == 0 and not self.fma_fallback
                and self.shared is not None and self.shared <= SMEM_LIMIT[self.target])


_PTXAS_RE = re.compile(r"Used (\d+) registers")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_usage(ptx: str, arch: int):
    """(registers, spill bytes, HGMMA count, HMMA count) of the one kernel in ``ptx``, from
    ``ptxas -v`` and the SASS of its object (``cuobjdump --dump-sass``, both from Triton's
    package)."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    ptxas = get_ptxas(arch).path
    cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        obj = os.path.join(tmp, "k.o")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", obj],
                              capture_output=True, text=True, check=True)
        sass = subprocess.run([cuobjdump, "--dump-sass", obj], capture_output=True, text=True,
                              check=True).stdout
    log = proc.stderr + proc.stdout
    regs = _PTXAS_RE.search(log)
    spill = _SPILL_RE.search(log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not read ptxas -v output:\n{log}")
    return (int(regs.group(1)), int(spill.group(1)) + int(spill.group(2)),
            len(re.findall(r"\bHGMMA\.", sass)), len(re.findall(r"\bHMMA\.", sass)))


def compile_variant(v: Variant, arch: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..kernels import register_cap

    try:
        fn = _kernel_fn(v.kernel)
        signature, constexprs, attrs = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            val = v.args[name]
            if isinstance(val, str) and (val.startswith("*") or val in ("i32", "i64", "fp32")):
                signature[name] = val
                # torch allocations are 16-byte aligned; triton's launcher specialises on it
                if val.startswith("*") or (v.aligned and name.startswith("stride")):
                    attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                signature[name] = "constexpr"
                constexprs[name] = val
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": v.num_warps, "num_stages": v.num_stages,
                                           "maxnreg": register_cap(v.num_warps)})
        regs, spills, hgmma, hmma = _ptxas_usage(compiled.asm["ptx"], arch)
        return Result(v.kernel, v.label, arch, regs, spills, int(compiled.metadata.shared), None, hgmma, hmma)
    except Exception as err:  # every failure is a row of the table, not a crash
        msg = str(err).strip().splitlines()
        return Result(v.kernel, v.label, arch, None, None, None,
                      f"{type(err).__name__}: {msg[0] if msg else ''}"[:200])


def _work(item):
    v, arch = item
    return compile_variant(v, arch)


def run_check(variants: List[Variant], targets=TARGETS, jobs: int = 1, progress: bool = True):
    items = [(v, arch) for v in variants for arch in targets]
    results: List[Result] = []
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(items), desc="compile-check", unit="kernel", file=sys.stderr)
        except ImportError:
            bar = None
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            for r in pool.imap(_work, items):
                results.append(r)
                if bar:
                    bar.update()
    else:
        for item in items:
            results.append(_work(item))
            if bar:
                bar.update()
    if bar:
        bar.close()
    return results


def format_table(results: List[Result]) -> str:
    head = (f"{'kernel':<22} {'configuration':<60} {'sm':>3} {'regs':>5} {'spill B':>8} {'smem B':>8} "
            f"{'limit B':>8} {'HGMMA':>6} {'HMMA':>6}  status")
    lines = [head, "-" * len(head)]
    for r in results:
        status = "ok" if r.ok else ("ERROR " + r.error if r.error else
                                    "SPILL" if r.spill_bytes else
                                    "FMA FALLBACK" if r.fma_fallback else "SMEM>LIMIT")

        def cell(v):
            return "-" if v is None else v

        lines.append(
            f"{r.kernel:<22} {r.label:<60} {r.target:>3} {cell(r.registers):>5} {cell(r.spill_bytes):>8} "
            f"{cell(r.shared):>8} {SMEM_LIMIT[r.target]:>8} {cell(r.hgmma):>6} {cell(r.hmma):>6}  {status}"
        )
    return "\n".join(lines)


def run(args) -> int:
    if triton_interpreting():
        raise UsageError("TRITON_INTERPRET is set: the interpreter replaces the kernels that "
                       "compile-check compiles; run it with TRITON_INTERPRET unset")
    if not triton_importable():
        raise UsageError("compile-check needs triton: pip install 'diffpool_fast[triton]'")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    if args.quick and args.representative:
        raise UsageError("--quick and --representative are exclusive")
    variants = representative_variants() if args.representative else all_variants(not args.quick)
    if args.kernel:
        variants = [v for v in variants if any(k in v.kernel for k in args.kernel)]
        if not variants:
            raise UsageError(f"no kernel matches --kernel {args.kernel}")
    results = run_check(variants, tuple(args.target or TARGETS), args.jobs,
                        progress=not args.no_progress)
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)}/{len(results)} kernel compilations ok"
          + (f", {len(bad)} failed (compile error, spill or shared memory over the limit)" if bad else ""))
    return 1 if bad else 0
