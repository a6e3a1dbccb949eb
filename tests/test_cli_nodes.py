"""`elixir train --shard-over auto|world|node`: the flag's checks before anything is built, and a run of four
ranks launched as two nodes of two (the environment torchrun gives them) that trains under the layout asked
for and says which one it used."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from dist import free_port

import elixir
from elixir.cli import build_parser, main
from elixir.cli.train.prepare import check_args, layout_line, shard_layout
from elixir.hardware import Hardware
from elixir.models import GPT, GPTConfig

TINY = ["train", "--model", "tiny", "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--eval-every", "0",
        "--eval-batches", "1", "--hardware", "CPU"]
LAUNCH = ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "SLURM_NTASKS")


@pytest.fixture
def launch(monkeypatch):
    """Set the launch's environment as torchrun would (no variable is left from the test's own)."""
    for name in LAUNCH:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    return set_env


def _error(capsys, *flags) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*TINY, *flags])
    assert exc.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("elixir train: error:")
    return message


def test_node_on_one_process_names_the_flag_and_the_fix(launch, capsys):
    launch()
    message = _error(capsys, "--shard-over", "node")
    assert "--shard-over node" in message and "one process" in message and "--shard-over world" in message


def test_node_on_one_node_is_refused(launch, capsys):
    launch(WORLD_SIZE=4, RANK=1, LOCAL_WORLD_SIZE=4, LOCAL_RANK=1, GROUP_RANK=0)
    message = _error(capsys, "--shard-over", "node")
    assert "one node" in message and "LOCAL_WORLD_SIZE=4" in message and "--nnodes" in message


def test_node_on_unequal_nodes_is_refused(launch, capsys):
    launch(WORLD_SIZE=4, RANK=0, LOCAL_WORLD_SIZE=3, LOCAL_RANK=0, GROUP_RANK=0)
    message = _error(capsys, "--shard-over", "node")
    assert "--shard-over node" in message and "LOCAL_WORLD_SIZE=3 does not divide the world size 4" in message


def test_node_without_the_nodes_in_the_environment_is_refused(launch, capsys):
    launch(WORLD_SIZE=4, RANK=0)
    message = _error(capsys, "--shard-over", "node")
    assert "--shard-over node" in message and "LOCAL_WORLD_SIZE" in message


def test_node_from_a_config_file_is_checked_alike(launch, capsys, tmp_path):
    launch()
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"shard_over": "node"}))
    assert "--shard-over node" in _error(capsys, "--config", str(config))
    config.write_text(json.dumps({"shard-over": "sideways"}))
    message = _error(capsys, "--config", str(config))
    assert "shard-over" in message and "auto, world, node" in message


def test_an_unknown_layout_lists_the_choices(capsys):
    with pytest.raises(SystemExit):
        main([*TINY, "--shard-over", "rack"])
    assert "'rack'" in capsys.readouterr().err


def test_node_on_two_nodes_passes_the_checks(launch):
    launch(WORLD_SIZE=4, RANK=3, LOCAL_WORLD_SIZE=2, LOCAL_RANK=1, GROUP_RANK=1)
    args = build_parser().parse_args([*TINY, "--shard-over", "node"])
    check_args(args)  # nothing is built: the process group does not exist yet
    assert args.shard_over == "node"


def test_a_plan_file_in_the_other_layout_is_refused(launch, capsys, tmp_path):
    launch()
    plan = elixir.Plan.uniform(GPT(GPTConfig.preset("tiny")), world_size=4, nodes=2)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    message = _error(capsys, "--plan", str(path), "--batch-size", "4", "--shard-over", "node")
    assert "--shard-over node" in message and "over all ranks" in message and "elixir plan --shard-over node" in message
    args = build_parser().parse_args([*TINY, "--plan", str(path), "--shard-over", "world"])
    args.batch_size = None
    check_args(args)  # the file's own layout: no conflict


def test_the_layout_line_says_where_chunks_are_sharded():
    model = GPT(GPTConfig.preset("tiny"))
    world = elixir.Plan.uniform(model, chunk_mib=0.05, world_size=4, nodes=2)
    node = elixir.Plan.uniform(model, chunk_mib=0.05, world_size=4, nodes=2, shard_over="node")
    assert shard_layout(world) == "world" and shard_layout(node) == "node"
    assert layout_line(world, "auto") == "layout: every chunk sharded over all 4 ranks of 2 nodes"
    assert layout_line(node, "node") == (
        "layout: every chunk sharded over the 2 ranks of each node, replicated across 2 nodes (--shard-over node)")
    mixed = dataclasses.replace(node, chunks=(dataclasses.replace(node.chunks[0], shard_over="world"),
                                              *node.chunks[1:]))
    assert shard_layout(mixed) == "mixed"
    assert f"{len(node.chunks) - 1} chunk(s) sharded over the 2 ranks of each node" in layout_line(mixed, "auto")


def _four_ranks_as_two_nodes(tmp_path, flags: list[str]) -> tuple[dict, str]:
    """`elixir train` on four ranks with the environment torchrun gives two nodes of two; rank 0's --json
    result and its output."""
    hw = dataclasses.replace(Hardware.preset("CPU"), collective_bytes_per_s={2: 4e9, 4: 3e9})
    (tmp_path / "hw.json").write_text(hw.to_json())
    port, out = free_port(), tmp_path / "result.json"
    base = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "GLOO_SOCKET_IFNAME": "lo",
            "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "4",
            "LOCAL_WORLD_SIZE": "2", "ELIXIR_CACHE_DIR": str(tmp_path / "cache")}
    args = [*TINY[:-2], "--hardware", str(tmp_path / "hw.json"), "--log-every", "1", "--timeout", "60",
            "--json", str(out), *flags]
    procs = [subprocess.Popen([sys.executable, "-m", "elixir", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r % 2), "GROUP_RANK": str(r // 2)})
             for r in range(4)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=240))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for r, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r}:\n{err[-3000:]}"
    return json.loads(out.read_text()), outputs[0][0]


@pytest.mark.dist
@pytest.mark.parametrize("plan", ["searched", "hand"])
def test_train_on_two_nodes_shards_inside_each_node_when_asked(tmp_path, plan):
    hand = ["--on-demand", "--chunk-mib", "0.05", "--cache-blocks", "2"] if plan == "hand" else []
    result, printed = _four_ranks_as_two_nodes(tmp_path, ["--shard-over", "node", *hand])
    assert (result["shard_over"], result["nodes"]) == ("node", 2)
    assert result["steps"] == 2 and result["train_loss"] == result["train_loss"]  # finite: not NaN
    assert ("layout: every chunk sharded over the 2 ranks of each node, replicated across 2 nodes "
            "(--shard-over node)") in printed
