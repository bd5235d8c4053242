"""gather_distributed=True: two gloo processes on the CPU against one process on the global batch.

API.md's convention (open_clip's gather_with_grad): each rank returns the mean over its own rows against
every rank's keys, so the average of the ranks' losses equals the single-process loss on the concatenated
batch, and each rank's gradient for its local features is world_size times the single-process gradient of
those rows (DDP averages gradients over ranks, so training matches one process exactly); a shared
parameter such as CLIP's logit scale gets, averaged over ranks, the single-process gradient.

One module-scoped fixture spawns two worker processes (this file run as a script) that compute every case
on both backends (the PyTorch path and the interpreted Triton kernels) and save their results; the tests
compute the single-process results and compare. Without a process group, every
``gather_distributed=True`` entry point raises RuntimeError.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from datetime import timedelta

import pytest
import torch

import fastssl.contrastive as C
from fastssl.distributed import all_gather_with_grad, is_initialized, rank, world_size
from fastssl.losses import CLIPLoss, ClipLoss, MoCoQueue, NTXentLoss, SigLipLoss

WORLD = 2
N, D = 5, 7  # rows per rank, feature width (odd on purpose)
QUEUE, QUEUE_BATCH, QUEUE_STEPS = 7, 3, 3  # 3 steps x 6 global keys through 7 rows: wraps twice
TIMEOUT_S = 120
BACKENDS = ("torch", "triton")  # the PyTorch path and the Triton kernels (interpreted on the CPU)
F64 = torch.float64


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-9, msg=lambda m: f"{what}: {m}")


def make_inputs(seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, dtype=F64, generator=gen)

    g = {name: randn(WORLD * N, D) for name in ("x", "w", "q", "k", "z1", "z2", "img", "txt", "bank_q", "bank_k")}
    g["scale"] = torch.tensor(7.3, dtype=F64)
    g["bias"] = torch.tensor(-2.1, dtype=F64)
    g["queue_init"] = randn(QUEUE, D)
    g["queue_keys"] = randn(QUEUE_STEPS, WORLD * QUEUE_BATCH, D)
    return g


def local(t: torch.Tensor, r: int, rows: int = N) -> torch.Tensor:
    return t[r * rows:(r + 1) * rows].clone()


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


# ----------------------------------------------------------------------------------------------------
# The worker: everything one rank computes
# ----------------------------------------------------------------------------------------------------

def run_rank(r: int, g: dict) -> dict:
    out = {"rank": rank(), "world_size": world_size(), "initialized": is_initialized()}

    x = leaf(local(g["x"], r))
    gathered = all_gather_with_grad(x)
    (gathered * g["w"] * (r + 1)).sum().backward()  # a different upstream gradient on each rank
    out["gather"], out["gather_grad"] = gathered.detach(), x.grad
    out["gather_noncontiguous"] = all_gather_with_grad(local(g["x"], r).t()).detach()  # (D, N) views

    q, k = leaf(local(g["q"], r)), leaf(local(g["k"], r))
    loss = C.info_nce(q, k, temperature=0.3, gather_distributed=True)
    loss.backward()
    out["info_nce"] = (loss.detach(), q.grad, k.grad)

    z1, z2 = leaf(local(g["z1"], r)), leaf(local(g["z2"], r))
    loss = C.nt_xent(z1, z2, temperature=0.4, gather_distributed=True)
    loss.backward()
    out["nt_xent"] = (loss.detach(), z1.grad, z2.grad)

    img, txt, scale = leaf(local(g["img"], r)), leaf(local(g["txt"], r)), leaf(g["scale"])
    loss = C.clip_loss(img, txt, scale, gather_distributed=True)
    loss.backward()
    out["clip_loss"] = (loss.detach(), img.grad, txt.grad, scale.grad)

    img, txt, scale, bias = leaf(local(g["img"], r)), leaf(local(g["txt"], r)), leaf(g["scale"]), leaf(g["bias"])
    loss = C.siglip_loss(img, txt, scale, bias, normalize=True, gather_distributed=True)
    loss.backward()
    out["siglip_loss"] = (loss.detach(), img.grad, txt.grad, scale.grad, bias.grad)

    img, txt, scale, bias = leaf(local(g["img"], r)), leaf(local(g["txt"], r)), leaf(g["scale"]), leaf(g["bias"])
    loss = SigLipLoss(rank=r, world_size=WORLD)(img, txt, scale, bias)
    loss.backward()
    out["SigLipLoss"] = (loss.detach(), img.grad, txt.grad, scale.grad, bias.grad)

    for local_loss in (False, True):
        for with_grad in (False, True):
            img, txt, scale = leaf(local(g["img"], r)), leaf(local(g["txt"], r)), leaf(g["scale"])
            loss = ClipLoss(local_loss, with_grad, rank=r, world_size=WORLD)(img, txt, scale, output_dict=True)
            loss["contrastive_loss"].backward()
            out[f"ClipLoss-{local_loss}-{with_grad}"] = (loss["contrastive_loss"].detach(), img.grad, txt.grad,
                                                        scale.grad)

    module = CLIPLoss(gather_distributed=True).double()
    img, txt = leaf(local(g["img"], r)), leaf(local(g["txt"], r))
    loss = module(img, txt)
    loss.backward()
    out["CLIPLoss"] = (loss.detach(), img.grad, txt.grad, module.logit_scale.grad)

    z1, z2 = leaf(local(g["z1"], r)), leaf(local(g["z2"], r))
    loss = NTXentLoss(temperature=0.4, gather_distributed=True)(z1, z2)
    loss.backward()
    out["NTXentLoss"] = (loss.detach(), z1.grad, z2.grad)

    queue = MoCoQueue(QUEUE, D, gather_distributed=True, dtype=F64)
    queue.queue.copy_(g["queue_init"])
    for step in range(QUEUE_STEPS):
        queue.enqueue(local(g["queue_keys"][step], r, QUEUE_BATCH))
    out["queue"] = (queue.negatives().clone(), queue.ptr)

    bank = NTXentLoss(temperature=0.2, memory_bank_size=(QUEUE, D), gather_distributed=True).double()
    bank.memory_bank.queue.copy_(torch.nn.functional.normalize(g["queue_init"], dim=1))  # a bank holds unit keys
    q = leaf(local(g["bank_q"], r))
    loss = bank(q, local(g["bank_k"], r))
    loss.backward()
    out["bank"] = (loss.detach(), q.grad, bank.memory_bank.negatives().clone(), bank.memory_bank.ptr)
    return out


def worker(r: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        g = torch.load(os.path.join(folder, "inputs.pt"))
        results = {}
        for backend in BACKENDS:  # read at each call: the same processes run both paths
            os.environ["FASTSSL_BACKEND"] = backend
            results[backend] = run_rank(r, g)
        torch.save(results, os.path.join(folder, f"rank{r}.pt"))
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# The test: one spawn of two processes, every case
# ----------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(folder) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, str(r), str(port), str(folder)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the {WORLD} gloo workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed (exit {p.returncode}):\n{log}"
    return [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(WORLD)]


def single_process(fn, *tensors):
    """fn on the global batch in one process: the loss and the gradients of every input."""
    leaves = [leaf(t) for t in tensors]
    loss = fn(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def check_convention(name, results, loss, grads, n_features, shared=()):
    """Average of rank losses == global loss; local feature grads == world_size x global rows' grads;
    shared parameters' grads averaged over ranks == global grads."""
    close(sum(res[name][0] for res in results) / WORLD, loss, f"{name} loss")
    for i in range(n_features):
        for r, res in enumerate(results):
            close(res[name][1 + i], WORLD * local(grads[i], r), f"{name} gradient of input {i} on rank {r}")
    for j, i in enumerate(shared, start=n_features):
        close(sum(res[name][1 + j] for res in results) / WORLD, grads[i], f"{name} shared gradient")


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """One spawn of two gloo processes computing every case on both backends: (inputs, backend -> per-rank results)."""
    from conftest import SESSION_SEED

    folder = tmp_path_factory.mktemp("gloo")
    g = make_inputs(SESSION_SEED)
    torch.save(g, folder / "inputs.pt")
    per_rank = run_workers(folder)
    return g, {backend: [res[backend] for res in per_rank] for backend in BACKENDS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_gather_with_grad_values_and_gradient(spawned, backend):
    g, results = spawned
    for r, res in enumerate(results[backend]):
        assert (res["rank"], res["world_size"], res["initialized"]) == (r, WORLD, True)
        close(res["gather"], g["x"], "all_gather_with_grad values (rank 0's rows first)")
        # backward: the upstream gradients (r+1) * w summed over ranks, this rank's slice
        close(res["gather_grad"], local(g["w"], r) * sum(range(1, WORLD + 1)), "all_gather_with_grad gradient")
        close(res["gather_noncontiguous"], torch.cat([local(g["x"], q).t() for q in range(WORLD)]),
              "all_gather_with_grad of a non-contiguous tensor")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["info_nce", "nt_xent", "NTXentLoss", "clip_loss", "CLIPLoss"])
def test_two_processes_equal_one_process_on_the_global_batch(spawned, backend, case):
    g, results = spawned
    if case == "info_nce":
        loss, grads = single_process(lambda q, k: C.info_nce(q, k, temperature=0.3), g["q"], g["k"])
        check_convention(case, results[backend], loss, grads, 2)
    elif case in ("nt_xent", "NTXentLoss"):
        loss, grads = single_process(lambda a, b: C.nt_xent(a, b, temperature=0.4), g["z1"], g["z2"])
        check_convention(case, results[backend], loss, grads, 2)
    elif case == "clip_loss":
        loss, grads = single_process(lambda i, t, s: C.clip_loss(i, t, s), g["img"], g["txt"], g["scale"])
        check_convention(case, results[backend], loss, grads, 2, shared=(2,))
    else:  # the module's logit_scale is a parameter: DDP averages its gradient over ranks
        log_scale = CLIPLoss().double().logit_scale.detach().clone()
        loss, grads = single_process(lambda i, t, s: C.clip_loss(i, t, s.exp()), g["img"], g["txt"], log_scale)
        check_convention(case, results[backend], loss, grads, 2, shared=(2,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["siglip_loss", "SigLipLoss"])
def test_siglip_two_processes_equal_one_process_on_the_global_batch(spawned, backend, case):
    """Each rank's images against every rank's texts: the ranks' average is the global loss, the local
    features' gradients world_size x the global ones, the parameters' averaged over ranks the global ones."""
    g, results = spawned
    normalize = case == "siglip_loss"
    loss, grads = single_process(lambda i, t, s, b: C.siglip_loss(i, t, s, b, normalize=normalize), g["img"], g["txt"],
                                 g["scale"], g["bias"])
    check_convention(case, results[backend], loss, grads, 2, shared=(2, 3))


def open_clip_reference(g, r, local_loss, with_grad):
    """open_clip's ClipLoss on rank r, simulated in one process: the features all-gathered with gradient
    (gather_with_grad), or as constants but for this rank's own (not local_loss) or all of them (local_loss);
    logits materialized as open_clip builds them."""
    img, txt = g["img"], g["txt"]
    scale = g["scale"]

    def gathered(x):
        if with_grad:
            return x
        parts = [local(x, q).detach() for q in range(WORLD)]
        if not local_loss:
            parts[r] = local(x, r)
        return torch.cat(parts)

    all_img, all_txt = gathered(img), gathered(txt)
    if local_loss:
        per_image = scale * local(img, r) @ all_txt.T
        per_text = scale * local(txt, r) @ all_img.T
        labels = torch.arange(N) + r * N
    else:
        per_image = scale * all_img @ all_txt.T
        per_text = per_image.T
        labels = torch.arange(WORLD * N)
    ce = torch.nn.functional.cross_entropy
    return (ce(per_image, labels) + ce(per_text, labels)) / 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("local_loss", [False, True])
@pytest.mark.parametrize("with_grad", [False, True])
def test_cliploss_open_clip_distributed_meaning(spawned, backend, local_loss, with_grad):
    """ClipLoss(local_loss, gather_with_grad, rank, world_size) on two gloo processes against open_clip's
    computation simulated in one process: each rank's loss, its local features' gradients (the gradients
    every rank's loss sends back to them) and its logit scale's gradient."""
    g, results = spawned
    leaves = {name: leaf(g[name]) for name in ("img", "txt", "scale")}
    losses = [open_clip_reference(dict(g, **leaves), r, local_loss, with_grad) for r in range(WORLD)]
    grad_img, grad_txt = torch.autograd.grad(sum(losses), (leaves["img"], leaves["txt"]), retain_graph=True)
    for r, res in enumerate(results[backend]):
        got = res[f"ClipLoss-{local_loss}-{with_grad}"]
        close(got[0], losses[r].detach(), f"loss on rank {r}")
        close(got[1], local(grad_img, r), f"image gradient on rank {r}")
        close(got[2], local(grad_txt, r), f"text gradient on rank {r}")
        close(got[3], torch.autograd.grad(losses[r], leaves["scale"], retain_graph=True)[0], f"scale gradient {r}")


def test_moco_queue_enqueues_the_global_batch(spawned):
    g, results = spawned
    expected = MoCoQueue(QUEUE, D, dtype=F64)  # one process enqueueing the global batches
    expected.queue.copy_(g["queue_init"])
    for step in range(QUEUE_STEPS):
        expected.enqueue(g["queue_keys"][step])
    for res in results["torch"]:
        close(res["queue"][0], expected.negatives(), "MoCoQueue(gather_distributed=True) contents")
        assert res["queue"][1] == expected.ptr


@pytest.mark.parametrize("backend", BACKENDS)
def test_ntxent_memory_bank_local_loss_global_enqueue(spawned, backend):
    """NTXentLoss with a bank: each rank's loss is local (its queries against the shared bank); the bank
    receives the global batch of normalized keys."""
    g, results = spawned
    expected = MoCoQueue(QUEUE, D, dtype=F64)
    expected.queue.copy_(torch.nn.functional.normalize(g["queue_init"], dim=1))
    expected.enqueue(torch.nn.functional.normalize(g["bank_k"], dim=1))  # 10 keys into 7 rows
    for r, res in enumerate(results[backend]):
        local_loss, (grad_q,) = single_process(
            lambda q: C.moco_loss(q, local(g["bank_k"], r), g["queue_init"], temperature=0.2), local(g["bank_q"], r))
        close(res["bank"][0], local_loss, f"memory-bank loss on rank {r}")
        close(res["bank"][1], grad_q, f"memory-bank gradient on rank {r}")
        close(res["bank"][2], expected.negatives(), "memory bank after a gathered enqueue")
        assert res["bank"][3] == expected.ptr == (WORLD * N) % QUEUE


# ----------------------------------------------------------------------------------------------------
# Without a process group
# ----------------------------------------------------------------------------------------------------

NO_GROUP = "process group"


def test_all_gather_with_grad_without_process_group_raises():
    assert not is_initialized() and rank() == 0 and world_size() == 1
    with pytest.raises(RuntimeError, match=NO_GROUP):
        all_gather_with_grad(torch.randn(4, 3))


@pytest.mark.parametrize("case", ["info_nce", "nt_xent", "clip_loss", "NTXentLoss", "CLIPLoss", "MoCoQueue"])
def test_gather_distributed_without_process_group_is_single_process(case):
    """API.md: without a process group gather_distributed=True is the single-process loss (lightly's meaning);
    MoCoQueue enqueues this process's keys."""
    assert not is_initialized() and rank() == 0 and world_size() == 1
    a, b = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    calls = {
        "info_nce": lambda g: C.info_nce(a, b, gather_distributed=g),
        "nt_xent": lambda g: C.nt_xent(a, b, gather_distributed=g),
        "clip_loss": lambda g: C.clip_loss(a, b, 10.0, gather_distributed=g),
        "NTXentLoss": lambda g: NTXentLoss(gather_distributed=g)(a, b),
        "CLIPLoss": lambda g: CLIPLoss(gather_distributed=g).double()(a, b),
    }
    if case == "MoCoQueue":
        queues = [MoCoQueue(8, 3, gather_distributed=g, dtype=F64) for g in (True, False)]
        queues[0].queue.copy_(queues[1].queue)
        for q in queues:
            q.enqueue(a)
        assert torch.equal(queues[0].negatives(), queues[1].negatives()) and queues[0].ptr == 4
        return
    assert torch.equal(calls[case](True), calls[case](False))


def test_all_gather_with_grad_rejects_non_tensors():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        all_gather_with_grad([1.0, 2.0])


if __name__ == "__main__":  # a worker: python test_distributed.py RANK PORT FOLDER
    try:
        worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
