"""Proof that the hot loops never wait for the host (GUIDE §6, §7), part c of ``benchmarks/gpu_check.sh``.

Each check builds its inputs, runs once to warm up (autotuning, first-call allocations), then runs again
under ``torch.cuda.set_sync_debug_mode("error")``, where any host synchronisation (``.item()``, a copy
from pageable host memory, ``nonzero``) raises:

- ``sample_loop``: a 20-step guided ``fastssl.sample`` (DDPM, in-kernel noise) with a small conv model;
- ``nt_xent_step``: one SimCLR training step (encoder, ``fastssl.nt_xent``, backward, SGD);
- ``propagate_labels_frame``: ``fastssl.propagate_labels`` over a short video (two long-memory frames);
- ``cuda_graph``: the same 20 guided steps (model + ``fastssl.ddpm_step`` with per-sample timesteps)
  captured in a CUDA graph and replayed; the replay must equal the eager loop;
- ``labelled_step``: the SimCLR step with labelled positives: ``fastssl.supcon_loss`` over class labels plus
  ``fastssl.info_nce`` with explicit targets (a permutation), whose label-mate sums run on the device. Last,
  because its first call autotunes the label kernels, which must not eat the older checks' time box.

On the CPU the checks run (so CI proves they work) but prove nothing about syncs, and the graph check
runs its loop eagerly twice. Run: ``python -m fastssl.benchmarks.sync_check [--device cuda] [--out syncs.json]``; it prints
one JSON line per check and exits 1 when a check fails.

>>> sorted(CHECKS)
['labelled_step', 'nt_xent_step', 'propagate_labels_frame', 'sample_loop']
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

STEPS, GUIDANCE = 20, 3.0


class _TinyDenoiser(torch.nn.Module):
    """eps(x, t, c) = conv(x) + emb(t) + emb(c): a model with every input on the device and no sync."""

    def __init__(self, channels: int = 4, classes: int = 10, timesteps: int = 1000):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.t_emb = torch.nn.Embedding(timesteps, channels)
        self.c_emb = torch.nn.Embedding(classes + 1, channels)  # the last class is "no condition"

    def forward(self, x, t, cond):
        return self.conv(x) + (self.t_emb(t) + self.c_emb(cond))[:, :, None, None].to(x.dtype)


def _sampling(device: str):
    import fastssl

    model = _TinyDenoiser().to(device)
    schedule = fastssl.NoiseSchedule.linear(1000).to(device)
    cond = torch.arange(8, device=device) % 10
    uncond = torch.full_like(cond, 10)
    return lambda: fastssl.sample(model, (8, 4, 32, 32), schedule, num_steps=STEPS, cond=cond, uncond=uncond,
                                  guidance=GUIDANCE, generator=0, progress=False)


def _training_step(device: str, loss_of):
    """One step of a two-view training loop whose loss is ``loss_of(z1, z2)``."""
    encoder = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 128)).to(device)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
    x = torch.randn(1024, 256, device=device)

    def step():
        z1, z2 = encoder(x + 0.1 * torch.randn_like(x)), encoder(x + 0.1 * torch.randn_like(x))
        loss = loss_of(z1, z2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss
    return step


def _nt_xent_step(device: str):
    import fastssl

    return _training_step(device, lambda z1, z2: fastssl.nt_xent(z1, z2, temperature=0.5))


def _labelled_step(device: str):
    import fastssl

    labels = torch.arange(1024, device=device) % 100
    targets = torch.randperm(1024, device=device)
    return _training_step(device, lambda z1, z2: fastssl.supcon_loss(torch.stack([z1, z2], 1), labels)
                          + fastssl.info_nce(z1, z2[targets.argsort()], targets))


def _propagate(device: str):
    import fastssl

    feats = F.normalize(torch.randn(4, 64, 30, 54, device=device), dim=1)
    first = torch.rand(5, 30, 54, device=device)
    return lambda: fastssl.propagate_labels(feats, first, context=2, long_memory=(0, 1), radius=6, topk=10)


CHECKS = {"sample_loop": _sampling, "nt_xent_step": _nt_xent_step, "propagate_labels_frame": _propagate,
          "labelled_step": _labelled_step}
RUN_ORDER = ["sample_loop", "nt_xent_step", "propagate_labels_frame", "cuda_graph", "labelled_step"]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_check(name: str, device: str) -> dict:
    """Warm up, then run ``CHECKS[name]`` with host syncs turned into errors (on CUDA)."""
    start = time.perf_counter()
    try:
        fn = CHECKS[name](device)
        fn()
        _sync(device)
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
        _sync(device)
        ok, detail = True, "no host sync" if device == "cuda" else "ran (the CPU proves no sync property)"
    except Exception as exc:  # a sync under "error" mode is a RuntimeError naming the call
        ok, detail = False, f"{type(exc).__name__}: {str(exc)[:400]}"
    return {"check": name, "device": device, "ok": ok, "detail": detail,
            "seconds": round(time.perf_counter() - start, 2)}


def _guided_steps(model, x, t_rows, prev_rows, schedule, both_cond, seeds):
    """The sampling loop as a user writes it: one batched model call and one fused step per timestep."""
    import fastssl

    for i in range(t_rows.shape[0]):
        m, u = model(torch.cat([x, x]), torch.cat([t_rows[i], t_rows[i]]), both_cond).chunk(2)
        x = fastssl.ddpm_step(m, t_rows[i], x, schedule, prev_t=prev_rows[i], uncond_output=u, guidance=GUIDANCE,
                              generator=seeds[i])
    return x


def graph_check(device: str) -> dict:
    """Capture ``STEPS`` guided steps in a CUDA graph, replay, compare with the eager loop. On the CPU
    the eager loop runs twice instead (same seeds, so the same result): the loop's code is exercised."""
    import fastssl

    start = time.perf_counter()
    try:
        model = _TinyDenoiser().to(device)
        schedule = fastssl.NoiseSchedule.linear(1000).to(device)
        ts = torch.arange(STEPS - 1, -1, -1, device=device) * (1000 // STEPS)
        t_rows, prev_rows = ts[:, None].repeat(1, 8), (ts - 1000 // STEPS).clamp(min=-1)[:, None].repeat(1, 8)
        cond = torch.arange(8, device=device) % 10
        args = (t_rows, prev_rows, schedule, torch.cat([cond, torch.full_like(cond, 10)]), list(range(100, 100 + STEPS)))
        x_T = torch.randn(8, 4, 32, 32, device=device)
        if device == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture (autotuning, allocations)
                _guided_steps(model, x_T, *args)
            torch.cuda.current_stream().wait_stream(side)
            graph, static_x = torch.cuda.CUDAGraph(), x_T.clone()
            with torch.cuda.graph(graph):
                replayed = _guided_steps(model, static_x, *args)
            graph.replay()
            how = "CUDA graph replay"
        else:
            replayed, how = _guided_steps(model, x_T, *args), "CPU: a second eager loop (no graph)"
        eager = _guided_steps(model, x_T, *args)
        _sync(device)
        diff = (replayed - eager).abs().max().item()
        ok = diff <= 1e-5 and bool(torch.isfinite(eager).all())
        detail = f"{how} vs eager: max |diff| {diff:.3g} over {STEPS} guided steps"
    except Exception as exc:
        ok, detail = False, f"{type(exc).__name__}: {str(exc)[:400]}"
    return {"check": "cuda_graph", "device": device, "ok": ok, "detail": detail,
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", metavar="FILE", help="write the results as one JSON list (atomically)")
    args = parser.parse_args(argv)
    from fastssl.benchmarks.harness import write_json

    results = []
    try:
        for name in RUN_ORDER:
            results.append(graph_check(args.device) if name == "cuda_graph" else run_check(name, args.device))
            print(json.dumps(results[-1]), flush=True)
            if args.out:  # after every check, so a time box keeps what was proven
                write_json(args.out, results)
    except KeyboardInterrupt:
        results.append({"check": "interrupted", "device": args.device, "ok": False, "detail": "time box", "seconds": 0.0})
        if args.out:
            write_json(args.out, results)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
