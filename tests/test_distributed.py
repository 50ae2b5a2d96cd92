"""torchrun with two gloo processes trains what one process trains with the same global batch."""

import atexit
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddp_worker
from qatkd.balance import GoR
from qatkd.config import load_config
from qatkd.train.distributed import (
    World,
    any_rank,
    average_gradients,
    broadcast,
    gather,
    init_world,
    mean_over_ranks,
)
from qatkd.train.held_out import HeldOutPass
from testdata import learning_overrides, write_one_image_npz


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def states(path: Path) -> tuple[dict, dict]:
    """What tests/ddp_worker.py saved: the student's and the balancer's state before and after
    training, on one process."""
    saved = torch.load(path, weights_only=True)
    return saved["initial"], saved["final"]


PARAMS = ("weight", "bias", "step")


def trained(state: dict, kind: str) -> dict[str, torch.Tensor]:
    """The trained tensors: the balancer's parameters, the student's weights and biases (not
    BatchNorm's running statistics, which each process updates from its own share)."""
    return {k: v for k, v in state[kind].items() if kind == "balancer" or k.endswith(PARAMS)}


def update_difference(one: tuple[dict, dict], two: tuple[dict, dict], kind: str) -> float:
    """|Δ_two - Δ_one| / |Δ_one|, Δ the change training made to the trained tensors."""
    (a0, a1), (b0, b1) = one, two
    delta_one = torch.cat(
        [(a1[kind][k] - a0[kind][k]).double().flatten() for k in trained(a0, kind)]
    )
    delta_two = torch.cat(
        [(b1[kind][k] - b0[kind][k]).double().flatten() for k in trained(b0, kind)]
    )
    return ((delta_two - delta_one).norm() / delta_one.norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("balancer", "tolerance"), [([], 1e-4), (["balancer.form=heldout", "balancer.every=2"], 1e-2)]
)
def test_two_processes_train_what_one_process_trains(
    learned_fp32: Path, tmp_path: Path, monkeypatch, balancer: list[str], tolerance: float
):
    """torchrun with two gloo processes, each with half of every global batch of 16, through the
    real CLI, pipeline and engine (tests/ddp_worker.py saves each rank's student and balancer).

    The data is one image under random labels, so BatchNorm normalises each half exactly as the
    whole batch, while the labels, and so the task loss, differ from half to half: with the
    model's and the balancer's gradients averaged over the processes, both ranks hold bitwise the
    same student and GoR parameters, and the run's updates equal one process's to ~1e-5 (as
    measured; a rank that skips either average is off by 3-40 %). The same holds for GoR form
    heldout: each rank takes its share of the held-out batch and the gradients are averaged
    before the alignments, so the ranks measure what one process measures on the whole batch;
    its parameters' updates agree to ~1e-3 (measured), as its alignments are cosines of nearly
    orthogonal gradients (~0.06) that carry the model's ~1e-5 differences amplified."""
    root = write_one_image_npz(tmp_path / "npz")
    common = [
        "data.augment=false",
        "train.epochs=2",
        f"teachers=[{learned_fp32 / 'last.pt'}]",
        "diag.every=3",
        *balancer,
    ]
    (tmp_path / "one").mkdir()
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    alone = learning_overrides(root, tmp_path / "one" / "run", *common)
    assert ddp_worker.run(tmp_path / "one", alone) == 0
    (tmp_path / "two").mkdir()
    torchrun = [
        *[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"],
        *["--master_addr=127.0.0.1", f"--master_port={free_port()}"],
        str(Path(ddp_worker.__file__)),
        str(tmp_path / "two"),
        *learning_overrides(root, tmp_path / "two" / "run", *common),
    ]
    result = subprocess.run(torchrun, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-6000:]  # the ranks' own errors come first
    assert result.stdout.count("run folder:") == 1  # rank 0 alone reports
    one = states(tmp_path / "one" / "rank0.pt")
    rank0, rank1 = (states(tmp_path / "two" / f"rank{r}.pt") for r in (0, 1))
    for kind in ("model", "balancer"):
        for key, value in rank0[1][kind].items():  # every parameter and buffer
            assert torch.equal(value, rank1[1][kind][key]), f"{kind} {key} differs across ranks"
        for key, value in one[0][kind].items():  # both runs start from the same student
            assert torch.equal(value, rank0[0][kind][key]), key
    moved = [
        (rank0[1]["balancer"][k] - rank0[0]["balancer"][k]).abs().item()
        for k in rank0[0]["balancer"]
        if k.startswith("params.")  # heldout also holds its last alignments
    ]
    assert len(moved) == 2 and min(moved) > 1e-3, moved  # GoR's two parameters trained
    assert update_difference(one, rank0, "model") < 1e-4
    assert update_difference(one, rank0, "balancer") < tolerance


def _on_rank(rank: int, port: int, results) -> None:
    """One gloo process of two, joined the way the CLI joins (`init_world`), for the tests below:
    a spawn costs seconds, so the three share one."""
    import torch.distributed as dist

    os.environ |= {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)}
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    init_world("cpu")
    joined = dist.is_initialized()
    world = World(rank, 2)
    balancer = GoR()
    for i, p in enumerate(balancer.parameters()):
        p.grad = torch.tensor(float(10 * rank + i))
    average_gradients(world, balancer)
    value = torch.tensor([1.0 + rank, 4.0 * rank])
    mean = mean_over_ranks(world, value)
    grad = held_out_pass(world)._mean([torch.full((2, 2), 2.0 * rank), None, value])
    collectives = (
        (any_rank(world, rank == 1), any_rank(world, False)),
        broadcast(world, f"from rank {rank}"),
        gather(world, {"rank": rank}),
        mean.tolist(),
        value.tolist(),  # not reduced in place
        [None if g is None else g.tolist() for g in grad],
    )
    # both ranks have finished connecting: a rank that tears down while the other is still
    # completing gloo's mesh closes a connection the other needs (seen under load)
    dist.barrier()
    atexit._run_exitfuncs()  # what the interpreter runs as it shuts down
    results[rank] = {
        "averaged": [p.grad.item() for p in balancer.parameters()],
        "collectives": collectives,
        "exit": (joined, dist.is_initialized()),
    }


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    """What each of two spawned gloo processes saw (`_on_rank`), by rank."""
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_on_rank, args=(free_port(), results), nprocs=2)
    return dict(results)


def test_balancer_gradients_are_averaged_over_processes(two_ranks):
    assert two_ranks[0]["averaged"] == two_ranks[1]["averaged"] == [5.0, 6.0]  # (0, 10), (1, 11)


def held_out_pass(world: World) -> HeldOutPass:
    """A pass over nothing: what `_mean` needs of one."""
    return HeldOutPass([], torch.nn.Identity(), None, [], load_config(), 1, world, None)


def test_collectives_give_every_rank_the_same_and_one_process_its_own(two_ranks):
    """Whether any rank's flag is set (with train.on_nonfinite=skip every rank must skip a step
    together, else the others hang), rank 0's value, every rank's in order, and means (a
    held-out pass's gradients too, a missing one left missing) on both of two gloo processes;
    alone, each is the value itself."""
    alone = World()
    assert (any_rank(alone, True), any_rank(alone, False)) == (True, False)
    value = torch.tensor([3.0])
    assert (broadcast(alone, "mine"), gather(alone, "mine")) == ("mine", ["mine"])
    assert mean_over_ranks(alone, value) is value
    grad = [value, None]
    assert held_out_pass(alone)._mean(grad) is grad
    for rank in (0, 1):
        assert two_ranks[rank]["collectives"] == (
            (True, False),
            "from rank 0",
            [{"rank": 0}, {"rank": 1}],
            [1.5, 2.0],
            [1.0 + rank, 4.0 * rank],
            [[[1.0, 1.0], [1.0, 1.0]], None, [1.5, 2.0]],
        )


def test_the_process_group_is_destroyed_at_exit(two_ranks):
    """Left to the interpreter's teardown, a gloo rank that exits first can abort (SIGABRT) and
    fail a finished torchrun run."""
    assert two_ranks[0]["exit"] == two_ranks[1]["exit"] == (True, False)
