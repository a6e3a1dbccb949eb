"""Fuzzed calibration caches: the hardware cache and the disk cache, mutated, truncated and random.

`Hardware.from_json` must return a record or raise a ValueError naming the file; the cache readers behind
`Hardware.measure` and `measure_disk` must never raise: a cache they cannot use is ignored with one
one-line warning (and measured again). Bounded time and memory, nothing written (see tests/fuzzing.py).
"""

import dataclasses
import json
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elixir.hardware import Hardware
from elixir.hardware import cache as hardware_cache
from fuzzing import byte_flips, check_reader, digests, dotted, examples, flipped, mutations, sha256, truncation_points

OPTIONAL = ("collective_bytes_per_s", "device_type", "disk_bytes", "disk_read_bytes_per_s", "disk_write_bytes_per_s",
            "attention_flops", "grouped_mm_flops", "intra_node_latency_s", "inter_node_bytes_per_s",
            "inter_node_latency_s", "op_overhead_s", "eager_bytes_per_s", "eager_rates", "interception_op_s",
            "fetch_overhead_s", "optim_step_overhead_s", "matmul_by_size", "host_bytes_per_s", "spare_cores")
"""Fields of a hardware file with a default."""


class Ignored(ValueError):
    """The outcome 'the cache was ignored with its warning', as check_reader counts named errors."""


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-caches")
    hw = dataclasses.replace(Hardware.preset("H100-80GB"), attention_flops={"bfloat16": 4e14},
                             grouped_mm_flops={"bfloat16": 3e14}, eager_rates={2**20: 2e12, 2**26: 3e12},
                             matmul_by_size={"bfloat16": {2**31: 4e14, 2**37: 7e14}})
    (folder / "hardware.json").write_text(hw.to_json())
    (folder / "disk.json").write_text(json.dumps({"format_version": hardware_cache._DISK_FORMAT_VERSION,
                                                  "folder": "/scratch", "read_bytes_per_s": 6.3e9,
                                                  "write_bytes_per_s": 3.4e9}))
    return folder


def _read_hardware(path):
    return Hardware.from_json(path.read_bytes(), source=str(path))


def _through_cache(read, path):
    """What `measure` sees: the cached figures, or None after exactly one one-line warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = read(path)
    if got is not None:
        assert not caught, [str(w.message) for w in caught]
        return got
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "\n" not in message and f"ignoring the calibration cache {path}" in message and len(message) < 400
    raise Ignored(message)


READERS = {
    "hardware.json": ("hardware calibration cache", hardware_cache._read_cache),
    "disk.json": ("disk calibration cache", hardware_cache._read_disk_cache),
}


def _may_load(name: str, how: str, path: tuple) -> bool:
    text = dotted(path)
    if how == "huge":
        return True
    if name == "disk.json":
        return text == "folder" and how == "remove"
    return (len(path) == 1 and how == "remove" and path[0] in OPTIONAL
            or len(path) == 2 and how == "remove" and path[0] in ("matmul_flops", "attention_flops",
                                                                   "grouped_mm_flops", "collective_bytes_per_s",
                                                                   "eager_rates", "matmul_by_size")
            or len(path) == 3 and how == "remove" and path[0] == "matmul_by_size")


@pytest.mark.slow
@settings(max_examples=examples(2.0))
@given(data=st.data())
def test_fuzzed_caches(caches, data):
    name = data.draw(st.sampled_from(sorted(READERS)))
    kind, read = READERS[name]
    path = caches / name
    good = path.read_bytes()
    doc, how, at = data.draw(mutations(json.loads(good)))
    path.write_bytes(json.dumps(doc).encode())
    try:
        strict = not _may_load(name, how, at)
        check_reader(kind, caches, lambda: _through_cache(read, path), Ignored, must_fail=strict)
        if name == "hardware.json":
            error = check_reader(kind, caches, lambda: _read_hardware(path), ValueError, must_fail=strict)
            assert error is None or str(error).startswith(str(path))
    finally:
        path.write_bytes(good)


@pytest.mark.parametrize("name", sorted(READERS))
def test_caches_truncated_at_every_byte(caches, name):
    kind, read = READERS[name]
    path = caches / name
    good = path.read_bytes()
    base = digests(caches)
    try:
        for n in truncation_points(len(good)):
            path.write_bytes(good[:n])
            check_reader(kind, caches, lambda: _through_cache(read, path), Ignored, must_fail=True,
                         before={**base, name: sha256(good[:n])})
    finally:
        path.write_bytes(good)


@settings(max_examples=examples(1.0))
@given(data=st.data())
def test_caches_of_random_bytes(caches, data):
    name = data.draw(st.sampled_from(sorted(READERS)))
    kind, read = READERS[name]
    path = caches / name
    good = path.read_bytes()
    path.write_bytes(data.draw(st.one_of(st.binary(max_size=2 * len(good)),
                                         byte_flips(len(good)).map(lambda flips: flipped(good, flips)))))
    try:
        check_reader(kind, caches, lambda: _through_cache(read, path), Ignored)
    finally:
        path.write_bytes(good)


def test_the_cache_files_are_valid(caches):
    assert _through_cache(hardware_cache._read_cache, caches / "hardware.json").name == "H100-80GB"
    assert _through_cache(hardware_cache._read_disk_cache, caches / "disk.json") == (6.3e9, 3.4e9)
