"""Fuzzed Hugging Face config.json: `build_family` (which `elixir plan --model` runs) on mutated, truncated and
random files must build a model on the meta device or raise a ValueError naming the file, within bounded
time and memory, writing nothing (see tests/fuzzing.py)."""

import json
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elixir.models.families import ESSENTIAL, build_family
from fuzzing import byte_flips, check_reader, digests, dotted, examples, flipped, mutations, sha256, truncation_points

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-config")
    transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             ).save_pretrained(folder)
    _build(folder / "config.json")  # the first build imports transformers' model code: not the reader's time
    return folder / "config.json"


def _build(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the list of defaulted fields: test_file_checks.py checks it
        return build_family(str(path))


def _must_fail(how: str, path: tuple, value) -> bool:
    """Mutations the config check itself must refuse: the model type and the essential sizes gone, of another
    type or negative, and a field of a typed default given a value of another type. Anything else is
    transformers' to judge, and either builds or is its refusal, named."""
    text = dotted(path)
    if text == "model_type" and how in ("remove", "retype"):
        return True
    if text in ESSENTIAL:
        return how in ("remove", "retype", "negative")
    if len(path) == 1 and how == "retype" and value is not None:
        default = getattr(transformers.LlamaConfig(), path[0], None)
        return isinstance(default, (bool, int, float, str))
    return False


@pytest.mark.slow
@settings(max_examples=examples(1.0))
@given(data=st.data())
def test_fuzzed_configs(config_file, data):
    good = config_file.read_bytes()
    doc, how, path = data.draw(mutations(json.loads(good)))
    value = doc
    for key in path:
        value = value[key] if key in value or isinstance(value, list) else None
    config_file.write_bytes(json.dumps(doc).encode())
    try:
        error = check_reader("config.json", config_file.parent, lambda: _build(config_file), ValueError,
                             must_fail=_must_fail(how, path, value))
        assert error is None or str(config_file) in str(error)
    finally:
        config_file.write_bytes(good)


def test_configs_truncated_at_every_byte(config_file):
    good = config_file.read_bytes()
    base = digests(config_file.parent)
    try:
        for n in truncation_points(len(good)):
            config_file.write_bytes(good[:n])
            check_reader("config.json", config_file.parent, lambda: _build(config_file), ValueError,
                         must_fail=good[:n].strip() != good.strip(), before={**base, "config.json": sha256(good[:n])})
    finally:
        config_file.write_bytes(good)


@settings(max_examples=examples(0.5))
@given(data=st.data())
def test_configs_of_random_bytes(config_file, data):
    good = config_file.read_bytes()
    config_file.write_bytes(data.draw(st.one_of(st.binary(max_size=2 * len(good)),
                                                byte_flips(len(good)).map(lambda flips: flipped(good, flips)))))
    try:
        check_reader("config.json", config_file.parent, lambda: _build(config_file), ValueError)
    finally:
        config_file.write_bytes(good)


def test_the_config_file_is_valid(config_file):
    assert sum(p.numel() for p in _build(config_file).parameters()) > 0
