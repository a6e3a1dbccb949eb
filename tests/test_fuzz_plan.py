"""Fuzzed plan JSON: `Plan.from_json` on mutated, truncated and random files must return a plan or raise a
ValueError naming the file, within bounded time and memory, reading nothing else (see tests/fuzzing.py)."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import elixir
from fuzzing import byte_flips, check_reader, digests, dotted, examples, flipped, mutations, sha256, truncation_points

REQUIRED = ("chunks", "chunk_numel", "cache_blocks")
"""The fields of a plan file without a default."""


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    plan = elixir.Plan.uniform(model, chunk_mib=24 * 4 / 2**20, cache_blocks=1, resident=False, param_home="host")
    plan = dataclasses.replace(plan, use_order=("0.weight", "0.bias", "1.weight", "1.bias"), grad_accum=2,
                               micro_batch_size=2, checkpoint_every=1, predicted={"step_s": 0.5, "flops": 1e9})
    folder = tmp_path_factory.mktemp("fuzz-plan")
    (folder / "plan.json").write_text(plan.to_json())
    return folder / "plan.json"


def _read(path):
    return elixir.Plan.from_json(path.read_bytes(), source=str(path))


def _may_load(how: str, path: tuple, value) -> bool:
    """Mutations that leave a plan valid by its format."""
    text = dotted(path)
    return (
        how == "huge"
        or text == "predicted" and how == "remove" or text.startswith("predicted.")  # the cost model's account
        or len(path) == 1 and how == "remove" and path[0] not in REQUIRED  # a field with a default
        or text.startswith("use_order[") and how == "remove"  # the runtime records what it lacks
        or text.startswith("chunks[") and text.endswith(("param_home", "optim_home")) and how == "remove"
        or text.startswith("param_shapes.") and len(path) == 3 and how == "remove"  # another shape, still a plan
    )


@settings(max_examples=examples(2.0))
@given(data=st.data())
def test_fuzzed_plans(plan_file, data):
    import json

    good = plan_file.read_bytes()
    doc, how, path = data.draw(mutations(json.loads(good)))
    value = doc
    try:
        for key in path:
            value = value[key]
    except (KeyError, IndexError):
        value = None
    text = json.dumps(doc).encode()
    plan_file.write_bytes(text)
    try:
        error = check_reader("plan JSON", plan_file.parent, lambda: _read(plan_file), ValueError,
                             must_fail=not _may_load(how, path, value))
        assert error is None or str(error).startswith(str(plan_file))
    finally:
        plan_file.write_bytes(good)


def test_plans_truncated_at_every_byte(plan_file):
    good = plan_file.read_bytes()
    base = digests(plan_file.parent)
    try:
        for n in truncation_points(len(good)):
            plan_file.write_bytes(good[:n])
            error = check_reader("plan JSON", plan_file.parent, lambda: _read(plan_file), ValueError, must_fail=True,
                                 before={**base, plan_file.name: sha256(good[:n])})
            assert str(error).startswith(str(plan_file))
    finally:
        plan_file.write_bytes(good)


@settings(max_examples=examples(1.0))
@given(data=st.data())
def test_plans_of_random_bytes(plan_file, data):
    good = plan_file.read_bytes()
    replaced = data.draw(st.one_of(st.binary(max_size=2 * len(good)),
                                   byte_flips(len(good)).map(lambda flips: flipped(good, flips))))
    plan_file.write_bytes(replaced)
    try:
        check_reader("plan JSON", plan_file.parent, lambda: _read(plan_file), ValueError)
    finally:
        plan_file.write_bytes(good)


def test_the_plan_file_is_valid(plan_file):
    assert _read(plan_file).chunk_numel == 24
