"""Train the embedded model in resumable chunks.

    python -m thrift_vllm.quality.train --out runs/embedded --minutes 9            # chunk 1
    python -m thrift_vllm.quality.train --out runs/embedded --minutes 9 --resume   # chunk 2, ...

Each chunk runs whole optimizer steps until ``--minutes`` (wall clock from process start, with
a reserve for saving) or ``--total-steps`` is reached, then writes ``OUT/ckpt.pt`` (model,
optimizer, step, RNG states, config), ``OUT/train_log.json`` (config, corpus description, every
logged loss, chunk boundaries) and exports ``OUT/model`` (the loadable directory). ``--resume``
refuses a changed run config (the schedule depends on it) except for the chunk-only options.

Data. Step ``s`` sequence ``b`` is generated from ``numpy.random.default_rng([seed, s, b])``
(``data.training_sequence``), so the data cursor *is* the step and a resumed run sees exactly
the batches an uninterrupted run sees. Mixture (``--mix``): stdlib-corpus windows and the three
synthetic tasks in their training forms. Curriculum (``--curriculum``): sequence length by
fraction of the run, capped at ``--max-len``; the batch holds ``tokens_per_step // L`` sequences,
so tokens per step stay constant. Loss: next-byte cross entropy over every position.

Optimisation: AdamW (betas 0.9/0.95, weight decay on matrices only), linear warmup then cosine
decay to ``min_lr_ratio * lr``, gradient clipping at 1.0, bf16 autocast on CUDA (fp32 master
weights), optional gradient checkpointing (``--grad-ckpt``), SDPA attention (flash on the
GPU). Batches are generated ahead by ``--data-workers`` spawned processes (4 on CUDA); the batch
of a step does not depend on the worker count.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from thrift_vllm.quality import data as qdata
from thrift_vllm.quality import model as qmodel

RUN_KEYS = ("seed", "total_steps", "tokens_per_step", "max_len", "curriculum", "mix", "lr",
            "min_lr_ratio", "warmup", "weight_decay", "model")
DEFAULTS = dict(seed=0, total_steps=3000, tokens_per_step=131072, max_len=32768,
                curriculum="0:2048,0.1:8192,0.3:16384,0.5:32768",
                mix="lm:0.4,kv:0.25,needle:0.15,var:0.2", lr=2e-3, min_lr_ratio=0.1,
                warmup=100, weight_decay=0.1, model="{}")


def parse_curriculum(s: str) -> list[tuple[float, int]]:
    out = sorted((float(a), int(b)) for a, b in (x.split(":") for x in s.split(",")))
    if not out or out[0][0] != 0.0:
        raise ValueError(f"curriculum must start at fraction 0: {s!r}")
    return out


def parse_mix(s: str) -> dict[str, float]:
    mix = {k: float(v) for k, v in (x.split(":") for x in s.split(","))}
    bad = set(mix) - {"lm", *qdata.TASK_KINDS}
    if bad:
        raise ValueError(f"unknown mixture components {sorted(bad)}")
    return mix


def seq_len_at(step: int, cfg: dict) -> int:
    frac = step / max(1, cfg["total_steps"])
    L = 0
    for f, n in parse_curriculum(cfg["curriculum"]):
        if frac >= f:
            L = n
    return min(L, cfg["max_len"])


def lr_at(step: int, cfg: dict) -> float:
    lr, warm, total = cfg["lr"], cfg["warmup"], cfg["total_steps"]
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    mn = cfg["min_lr_ratio"]
    return lr * (mn + (1 - mn) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def batch_at(step: int, cfg: dict, corpus_train: np.ndarray) -> torch.Tensor:
    L = seq_len_at(step, cfg)
    B = max(1, cfg["tokens_per_step"] // L)
    mix = parse_mix(cfg["mix"])
    seqs = [qdata.training_sequence(np.random.default_rng([cfg["seed"], step, b]), L,
                                    corpus_train, mix) for b in range(B)]
    return torch.from_numpy(np.stack(seqs))


_WORKER: dict = {}


def _worker_init(stdlib: str | None) -> None:
    _WORKER["train"] = qdata.load_corpus(stdlib).train


def _worker_batch(step: int, cfg: dict) -> np.ndarray:
    return batch_at(step, cfg, _WORKER["train"]).numpy()


class Batches:
    """``batch_at(step)`` for consecutive steps, generated ahead by ``workers`` spawned processes
    (each loads the same corpus; the result does not depend on the worker count)."""

    def __init__(self, cfg: dict, corpus_train: np.ndarray, stdlib: str | None, workers: int):
        self.cfg, self.train, self.pool, self.pending = cfg, corpus_train, None, {}
        if workers > 0:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                            initializer=_worker_init, initargs=(stdlib,))
            self.ahead = 2 * workers

    def get(self, step: int) -> torch.Tensor:
        if self.pool is None:
            return batch_at(step, self.cfg, self.train)
        for s in range(step, min(step + self.ahead, self.cfg["total_steps"])):
            if s not in self.pending:
                self.pending[s] = self.pool.submit(_worker_batch, s, self.cfg)
        return torch.from_numpy(self.pending.pop(step).result())

    def close(self) -> None:
        if self.pool is not None:
            for f in self.pending.values():
                f.cancel()
            self.pool.shutdown(wait=True, cancel_futures=True)


def _optimizer(model, cfg):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=cfg["lr"], betas=(0.9, 0.95), eps=1e-8,
                             fused=torch.cuda.is_available() or None)


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def fit_total_steps(step_s: dict[int, float], cfg: dict, seconds: float) -> int:
    """Steps that fit ``seconds`` given measured seconds per step at each curriculum length.

    Plain arithmetic: the curriculum gives each length a fraction of the run, so a run of ``N``
    steps takes ``N * sum(frac_L * t_L)``.
    """
    cur = [*parse_curriculum(cfg["curriculum"]), (1.0, 0)]
    per_step = 0.0
    for (f0, n), (f1, _) in itertools.pairwise(cur):
        per_step += (f1 - f0) * step_s[min(n, cfg["max_len"])]
    return max(1, int(seconds / per_step))


def probe_step_times(cfg: dict, corpus_train: np.ndarray, device: torch.device,
                     reps: int = 3) -> dict[int, float]:
    """Seconds per optimizer step at each curriculum length (a throwaway model; the first step
    of each length is a warm-up). Data generation is excluded (workers run ahead)."""
    mconf = qmodel.make_config(**json.loads(cfg["model"]))
    mconf._attn_implementation = "sdpa"
    model = qmodel.make_model(mconf, seed=cfg["seed"]).to(device)
    model.config.use_cache = False
    opt = _optimizer(model, cfg)
    out = {}
    for _, n in parse_curriculum(cfg["curriculum"]):
        L = min(n, cfg["max_len"])
        if L in out:
            continue
        x = batch_at(0, {**cfg, "curriculum": f"0:{L}"}, corpus_train).to(device)
        times = []
        for _ in range(reps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            ts = time.time()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.time() - ts)
        out[L] = sum(times[1:]) / reps
        print(f"[train] probe L={L}: {out[L]:.3f} s/step", flush=True)
    del model, opt
    return out


def train(args: argparse.Namespace) -> dict:
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out / "ckpt.pt", out / "train_log.json"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = {k: getattr(args, k) for k in RUN_KEYS}

    if args.resume:
        if not ckpt_path.exists():
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        saved = json.loads(state["config"])
        given = {k: v for k, v in cfg.items() if v != DEFAULTS[k]}
        diff = {k: (saved[k], v) for k, v in given.items() if saved[k] != v}
        if diff:
            raise SystemExit(f"--resume with a changed run config (saved, given): {diff}")
        cfg = saved
        log = json.loads(log_path.read_text())
    else:
        if ckpt_path.exists() and not args.overwrite:
            raise SystemExit(f"{ckpt_path} exists: pass --resume (or --overwrite to restart)")
        state = None
        log = {"config": cfg, "argv": sys.argv, "chunks": [], "losses": []}

    corpus = qdata.load_corpus(args.stdlib)
    if args.fit_minutes is not None and state is None:
        # Size the run (total_steps) to a wall-clock budget; the chosen value is logged, so
        # `--total-steps N` reproduces the run without the probe.
        probe = probe_step_times(cfg, corpus.train, device)
        cfg["total_steps"] = fit_total_steps(probe, cfg, args.fit_minutes * 60.0)
        log["config"] = cfg
        log["probe_s_per_step"] = {str(k): round(v, 4) for k, v in probe.items()}
        print(f"[train] --fit-minutes {args.fit_minutes}: total_steps={cfg['total_steps']}",
              flush=True)
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    mconf = qmodel.make_config(**json.loads(cfg["model"]))
    mconf._attn_implementation = "sdpa"
    model = qmodel.make_model(mconf, seed=cfg["seed"])
    model.config._attn_implementation = "sdpa"
    model.config.use_cache = False
    model.to(device)
    opt = _optimizer(model, cfg)
    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
    log["corpus"] = corpus.describe()
    log.setdefault("python", sys.version)
    n_par = qmodel.n_params(model)
    log["n_params"] = n_par
    print(f"[train] device={device} params={n_par / 1e6:.2f}M step={step}/{cfg['total_steps']} "
          f"corpus={corpus.train.size / 1e6:.1f}MB train, {corpus.heldout.size / 1e6:.2f}MB "
          f"held out", flush=True)
    if not args.resume:
        print("[train] config " + json.dumps(cfg), flush=True)

    amp = device.type == "cuda"
    workers = args.data_workers if args.data_workers is not None else (
        4 if device.type == "cuda" else 0)
    batches = Batches(cfg, corpus.train, args.stdlib, workers)
    model.train()
    chunk = {"start_step": step, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    budget = args.minutes * 60.0 - args.reserve_s
    step_times: list[float] = []
    done = 0
    while step < cfg["total_steps"]:
        if args.max_steps is not None and done >= args.max_steps:
            break
        est = (sum(step_times[-5:]) / len(step_times[-5:])) if step_times else 0.0
        if time.time() - t0 + 1.5 * est > budget:
            break
        ts = time.time()
        x = batches.get(step).to(device, non_blocking=True)
        L = x.shape[1]
        use_ckpt = args.grad_ckpt == "on" or (args.grad_ckpt == "auto" and L >= 16384)
        if use_ckpt != model.is_gradient_checkpointing:
            if use_ckpt:
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = float(loss.detach())
        step += 1
        done += 1
        step_times.append(time.time() - ts)
        log["losses"].append([step, lv, lr, L, int(x.numel()), float(gn)])
        if step % args.log_every == 0 or done == 1 or step == cfg["total_steps"]:
            el = time.time() - t0
            print(f"[train] step {step}/{cfg['total_steps']} L={L} B={x.shape[0]} "
                  f"loss={lv:.4f} ({lv / math.log(2):.3f} bits/byte) lr={lr:.2e} "
                  f"gnorm={float(gn):.2f} {step_times[-1]:.2f}s/step elapsed={el:.0f}s",
                  flush=True)

    batches.close()
    chunk.update(end_step=step, steps=done, wall_s=round(time.time() - t0, 1),
                 mean_step_s=round(sum(step_times) / max(1, len(step_times)), 3))
    log["chunks"].append(chunk)
    _save(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                      "rng_cpu": torch.get_rng_state(),
                      "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
                      "config": json.dumps(cfg)})
    tail = [r[1] for r in log["losses"][-50:]]
    log["last_loss_mean50"] = sum(tail) / max(1, len(tail))
    log["step"] = step
    log["finished"] = step >= cfg["total_steps"]
    _write_json(log_path, log)
    if not args.no_export:
        qmodel.export(model, out / "model", extra={
            "trained_by": "python -m thrift_vllm.quality.train", "config": cfg, "step": step,
            "finished": log["finished"], "corpus": log["corpus"], "python": log["python"],
            "last_loss_mean50": log["last_loss_mean50"], "n_params": n_par})
    print(f"[train] chunk done: steps {chunk['start_step']}..{step} in {chunk['wall_s']}s; "
          f"checkpoint {ckpt_path}; {'finished' if log['finished'] else 'resume with --resume'}",
          flush=True)
    return log


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m thrift_vllm.quality.train",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=9.0, help="wall-clock budget of this chunk")
    p.add_argument("--reserve-s", type=float, default=30.0, help="kept for save/export")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--fit-minutes", type=float, default=None,
                   help="first chunk only: time one step per curriculum length and set "
                        "--total-steps so the whole run takes about this long")
    p.add_argument("--max-steps", type=int, default=None, help="stop this chunk after N steps")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--grad-ckpt", choices=("auto", "on", "off"), default="off",
                   help="gradient checkpointing; auto = on for L >= 16K (not needed on an H200: "
                        "~10 GB of activations at 131K tokens per step)")
    p.add_argument("--device", default=None)
    p.add_argument("--data-workers", type=int, default=None,
                   help="processes generating batches ahead (default 4 on CUDA, 0 on CPU)")
    p.add_argument("--stdlib", default=None, help="stdlib directory (default: this Python's)")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--total-steps", type=int, default=DEFAULTS["total_steps"])
    p.add_argument("--tokens-per-step", type=int, default=DEFAULTS["tokens_per_step"])
    p.add_argument("--max-len", type=int, default=DEFAULTS["max_len"])
    p.add_argument("--curriculum", default=DEFAULTS["curriculum"],
                   help="fraction:length,... (length capped at --max-len)")
    p.add_argument("--mix", default=DEFAULTS["mix"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--min-lr-ratio", type=float, default=DEFAULTS["min_lr_ratio"])
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--model", default=DEFAULTS["model"],
                   help="JSON overrides of the LlamaConfig (tests use tiny sizes)")
    return p


def main(argv: list[str] | None = None) -> dict:
    return train(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
