"""index_builder/config.py: byte sizes, BuildConfig's checks (each error names its field), values and YAML."""
from __future__ import annotations

import pytest

from index_builder.config import BuildConfig, make, parse_bytes
from shards.errors import ConfigError

from helpers import build_config

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@pytest.mark.parametrize("text,want", [
    ("512M", 512 * MiB),
    ("4G", 4 * GiB),
    ("1.5G", int(1.5 * GiB)),
    ("100k", 100 * KiB),
    ("100K", 100 * KiB),
    ("1T", 1 << 40),
    ("4GiB", 4 * GiB),
    ("4GB", 4 * GiB),
    ("4gib", 4 * GiB),
    ("12.5 MiB", int(12.5 * MiB)),
    (" 2 G ", 2 * GiB),
    ("123", 123),
    ("0", 0),
    (4096, 4096),
])
def test_parse_bytes(text, want):
    assert parse_bytes(text) == want


@pytest.mark.parametrize("text", ["", "G", "4X", "-1G", "1,5G", "1e9", "four", "4 G B", "4P", "4GG", "0x10"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="write it like 512M, 4G"):
        parse_bytes(text)


# (config overrides, fragments the one ConfigError must contain)
CONFIG_ERROR_ROWS = [
    ({"shards": 0}, ["shards: must be at least 1, got 0"]),
    ({"shards": "two"}, ["shards:", "integer"]),
    ({"batch_size": -1}, ["batch_size: must be at least 1"]),
    ({"part_rows": 0}, ["part_rows: must be at least 1"]),
    ({"shards": 0, "batch_size": 0}, ["shards:", "batch_size:"]),
    ({"shard": 2}, ["shard: unknown option", "check the spelling"]),
    ({"bad_rows": "drop"}, ["bad_rows:", "'error' or 'skip'"]),
    ({"metric": "cosine"}, ["metric:", "'ip' or 'l2'"]),
    ({"sharding": "range"}, ["sharding:", "'hash'"]),
    ({"actors": 0}, ["actors: must be at least 1", "leave it out"]),
    ({"target_recall": 0}, ["target_recall: must be in (0, 1]"]),
    ({"target_recall": 1.5}, ["target_recall:", "got 1.5"]),
    ({"memory_budget": "lots"}, ["memory_budget: 'lots' is not a size", "512M"]),
    ({"memory_budget": "4X"}, ["memory_budget:", "4G"]),
    ({"memory_budget": "0"}, ["memory_budget: '0' is under 1 MiB", "4G"]),
    ({"memory_budget": 1000}, ["memory_budget: '1000' is under 1 MiB"]),
    ({"vector_column": "vec", "model": "m"}, ["--model or --vector-column, not both"]),
    ({"fields": "id,title"}, ["fields: 'id' is the id column"]),
]


@pytest.mark.parametrize("overrides,fragments", CONFIG_ERROR_ROWS)
def test_config_errors_name_the_field(overrides, fragments):
    with pytest.raises(ConfigError) as e:
        build_config(**overrides)
    msg = str(e.value)
    assert msg.startswith("config: ")
    for f in fragments:
        assert f in msg


def test_config_missing_fields_are_named():
    with pytest.raises(ConfigError, match="source: required; index_root: required"):
        make(BuildConfig, {})


def test_config_errors_name_where():
    with pytest.raises(ConfigError, match=r"^build\.yaml: shards:"):
        make(BuildConfig, {"source": "s", "index_root": "r", "shards": 0}, where="build.yaml")


def test_config_assignment_is_validated():
    c = build_config()
    with pytest.raises(Exception, match="shards"):
        c.shards = 0


@pytest.mark.parametrize("overrides,attr,want", [
    ({}, "budget_bytes", 4 * GiB),
    ({"memory_budget": "512M"}, "budget_bytes", 512 * MiB),
    ({"memory_budget": 1 << 30}, "budget_bytes", 1 << 30),      # YAML writes a byte count as an int
    ({"fields": "title, url ,"}, "fields", ["title", "url"]),
    ({}, "stored_fields", ["text"]),
    ({"text_column": "body"}, "stored_fields", ["body"]),
    ({"vector_column": "vec"}, "stored_fields", []),
    ({"vector_column": "vec", "fields": ["title"]}, "stored_fields", ["title"]),
    ({"fields": []}, "stored_fields", []),
])
def test_config_values(overrides, attr, want):
    assert getattr(build_config(**overrides), attr) == want


@pytest.mark.parametrize("text,overrides,fragments", [
    ("source: c\nindex_root: i\nshrads: 2\n", {}, ["shrads: unknown option"]),
    ("source: c\nindex_root: i\nbad_rows: maybe\n", {}, ["bad_rows:"]),
    ("source: c\nindex_root: i\nshards: 0\n", {}, ["shards: must be at least 1"]),
    ("source: c\nshards: 2\n", {}, ["index_root: required"]),
    ("", {}, ["source: required"]),
    ("- a\n- b\n", {}, ["expected a mapping of option names to values"]),
    ("source: c\nindex_root: i\n", {"shards": 0}, ["shards:"]),        # overrides are checked too
])
def test_from_yaml_errors_name_the_file_and_key(tmp_path, text, overrides, fragments):
    path = tmp_path / "build.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        BuildConfig.from_yaml(str(path), **overrides)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ")
    for f in fragments:
        assert f in msg


def test_from_yaml_with_overrides(tmp_path):
    path = tmp_path / "build.yaml"
    path.write_text("source: s3://bucket/corpus\nindex_root: ./index\nshards: 4\nmemory_budget: 2G\n"
                    "fields: title,url\nbad_rows: skip\n")
    c = BuildConfig.from_yaml(str(path), shards=8, factory=None, metric="ip")  # None: not given on the CLI
    assert (c.source, c.shards, c.factory, c.metric, c.bad_rows) == ("s3://bucket/corpus", 8, "auto", "ip", "skip")
    assert c.budget_bytes == 2 * GiB and c.fields == ["title", "url"]


# (the YAML file's bytes) -> fragments of the one-line error, which names the file
YAML_ERROR_ROWS = [
    (b"source: a\nindex_root: [b\n", ["line 3, column 1", "not valid YAML", "option_name: value"]),
    (b"source: a\n  index_root: b\n", ["line 2, column 13", "mapping values are not allowed"]),
    (b"- source\n- index_root\n", ["expected a mapping of option names to values", "got a list"]),
    (b"just words\n", ["got a str"]),
    (b"source: a\nindex_root: b\nshard: 2\n", ["shard: unknown option", "--help"]),
    (b"\x00\xff\xfe", ["not UTF-8 text"]),
]


@pytest.mark.parametrize("text,fragments", YAML_ERROR_ROWS)
def test_bad_yaml_config_is_one_line_naming_the_file(tmp_path, text, fragments):
    path = tmp_path / "build.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError) as e:
        BuildConfig.from_yaml(str(path))
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_missing_yaml_config_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"^--config .*nope\.yaml: No such file or directory"):
        BuildConfig.from_yaml(str(tmp_path / "nope.yaml"))


def test_yaml_config_is_read(tmp_path):
    path = tmp_path / "build.yaml"
    path.write_text("source: a\nindex_root: b\nshards: 3\nmemory_budget: 1G\n")
    c = BuildConfig.from_yaml(str(path), shards=4)
    assert (c.source, c.shards, c.budget_bytes) == ("a", 4, GiB)    # the flag given wins
