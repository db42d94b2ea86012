"""Method configurations of the quality harness: ``MethodConfig`` (operator methods and the
paged KV-layout rows), ``kv_config``, ``method_grid``, the two-step NLL split (``nll_split``) and
the actual FP16 share of a budget (``fp16_share``). Imports nothing else from the harness.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_LAYOUTS = ("operator", "nvfp4", "auto")
_KV_TAG = {"nvfp4": "kv4", "auto": "kvauto"}


@dataclass(frozen=True)
class MethodConfig:
    method: str  # fp16 | fp4 | thrift
    quant_format: str = "nvfp4"
    fp16_budget: float = 0.0
    selection: str = "block_mean"
    force_sink_recent: bool = False
    bulk_math: str = "bf16"
    block_size: int = 64
    kv_layout: str = "operator"  # operator (one prefill) | nvfp4 / auto (paged, two steps)

    def __post_init__(self):
        if self.kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {self.kv_layout!r}")
        if self.paged and self.bulk_math != "bf16":
            raise ValueError("the paged path computes FP4 exactly: bulk_math must be bf16")

    @property
    def paged(self) -> bool:
        return self.kv_layout != "operator"

    @property
    def budget(self) -> float:
        """The FP16 budget the method amounts to (fp16 -> 1, fp4 -> 0)."""
        return {"fp16": 1.0, "fp4": 0.0}.get(self.method, self.fp16_budget)

    @property
    def name(self) -> str:
        pre = self.method + (f"-{_KV_TAG[self.kv_layout]}" if self.paged else "")
        if self.method == "fp16":
            return f"{pre}/{self.quant_format}" if self.paged else pre
        if self.method == "fp4":
            return f"{pre}/{self.quant_format}/{self.bulk_math}"
        sel = self.selection + ("+sr" if self.force_sink_recent else "")
        return (f"{pre}/{self.quant_format}/{self.bulk_math}/{sel}/"
                f"{100 * self.fp16_budget:g}%")

    @property
    def selection_label(self) -> str:
        return self.selection + ("+sr" if self.force_sink_recent else "")

    def operator_kwargs(self) -> dict:
        return dict(method=self.method, quant_format=self.quant_format,
                    fp16_budget=self.budget, selection=self.selection,
                    force_sink_recent=self.force_sink_recent,
                    bulk_math=self.bulk_math, block_size=self.block_size)

    def kv_layout_obj(self, head_size: int, dtype: torch.dtype):
        """The paged layout of a kv-layout config (page = one selection unit)."""
        from thrift_vllm.kv_layout import KVLayout

        return KVLayout(self.kv_layout, head_size, self.block_size, self.block_size,
                        self.quant_format, self.selection, dtype)


def kv_config(kv_layout: str, quant_format: str, budget: float, selection: str = "block_mean",
              force_sink_recent: bool = False) -> MethodConfig:
    """A paged config: budget 0 -> method fp4, 1 -> fp16 (selection then does not matter)."""
    method = {0.0: "fp4", 1.0: "fp16"}.get(float(budget), "thrift")
    if method != "thrift":
        selection, force_sink_recent, budget = "block_mean", False, 0.0
    return MethodConfig(method, quant_format, float(budget), selection, force_sink_recent,
                        kv_layout=kv_layout)


def nll_split(length: int) -> tuple[int, int]:
    """(step-1 ids, step-2 ids) of an NLL sample of ``length`` ids: the last ``(L - 1) // 4``
    predictions (``nll_tail``) come from step 2."""
    q = max(1, (length - 1) // 4)
    return length - 1 - q, q


def _share(budget: float, sq: int, skv: int, block_size: int) -> float:
    from thrift_vllm.selection import BlockGrid, budget_to_k

    grid = BlockGrid(sq, skv, block_size, True)
    k = budget_to_k(budget, grid)
    first, step, rows = grid.candidate_counts()
    counts = [first + step * r for r in range(rows)]
    return sum(min(k, c) for c in counts) / sum(counts)


def fp16_share(cfg: MethodConfig, length: int) -> float:
    """Actual share of causal candidate blocks computed in FP16 (the operator's budget -> k rule,
    ``thrift_vllm.selection.budget_to_k``): for a full prefill of ``length``, or, for a paged
    config, for the NLL sample's step 2 (``nll_split``)."""
    if cfg.method != "thrift":
        return cfg.budget
    if cfg.paged:
        s1, s2 = nll_split(length)
        return _share(cfg.fp16_budget, s2, s1 + s2, cfg.block_size)
    return _share(cfg.fp16_budget, length, length, cfg.block_size)


def method_grid(formats=("nvfp4", "mxfp4"), thrift_formats=("nvfp4",),
                budgets=(0.01, 0.025, 0.05, 0.10, 0.25),
                selections=("block_mean", "quest", "local", "block_mean+sr", "quest+sr"),
                bulk_maths=("bf16", "fp8"), kv_layouts=("operator",),
                kv_budgets=(0.0, 0.025, 0.05, 0.10, 0.25, 1.0),
                kv_selections=("block_mean", "quest")) -> list[MethodConfig]:
    """fp16, fp4 per format and bulk math, thrift per format x bulk math x selection x budget
    (when ``"operator"`` is in ``kv_layouts``), then per paged layout ("nvfp4", "auto") and
    thrift format the paged rows at ``kv_budgets`` (0 and 1 once, not per selection) x
    ``kv_selections``, bulk math bf16, plus the ``fp4/F/bf16`` baseline their recovery needs.
    A selection ``"X+sr"`` is selection X with ``force_sink_recent``."""
    out = [MethodConfig("fp16")]
    fmts = list(dict.fromkeys([*formats, *thrift_formats]))
    for bm in bulk_maths:
        for f in fmts:
            out.append(MethodConfig("fp4", f, bulk_math=bm))
        if "operator" not in kv_layouts:
            continue
        for f in thrift_formats:
            for sel in selections:
                base, sr = _split_sel(sel)
                for b in budgets:
                    out.append(MethodConfig("thrift", f, b, base, sr, bm))
    for lay in kv_layouts:
        if lay == "operator":
            continue
        for f in thrift_formats:
            out.append(MethodConfig("fp4", f))
            # fp4-kv4, fp16-kv4 once (the selection does not matter), first
            out += [kv_config(lay, f, b) for b in (0.0, 1.0) if b in kv_budgets]
            out += [kv_config(lay, f, b, *_split_sel(sel)) for sel in kv_selections
                    for b in kv_budgets if 0.0 < b < 1.0]
    return list(dict.fromkeys(out))


def _split_sel(sel: str) -> tuple[str, bool]:
    return (sel[:-3], True) if sel.endswith("+sr") else (sel, False)

