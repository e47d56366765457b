"""Reading a stage config file: every format, and a clear error naming the file for one that
does not parse or holds something other than a table."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dcgen.train.config import ConfigError, TrainConfig, read_config_file


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("c.toml", 'steps = 3\nlr = 0.5\nname = "x"\n'),
        ("c.json", '{"steps": 3, "lr": 0.5, "name": "x"}'),
    ],
)
def test_reads_each_format(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    assert read_config_file(path) == {"steps": 3, "lr": 0.5, "name": "x"}


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.toml", "steps = = 3\n", "invalid TOML"),
        ("bad.json", '{"steps": 3', "invalid JSON"),
        ("list.json", "[1, 2]", "expected a table of settings, got list"),
        ("c.ini", "[train]\nsteps = 3\n", "expected a .toml, .yaml/.yml or .json"),
    ],
)
def test_bad_files_raise_config_errors_naming_the_file(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    for read in (read_config_file, TrainConfig.from_file):
        with pytest.raises(ConfigError, match=expected) as err:
            read(path)
        assert str(path) in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_config_file(tmp_path / "nope.toml")


def test_python_310_reads_toml_through_the_tomli_backport(tmp_path):
    # Python 3.10 has no tomllib; the package then imports tomli (a dependency there). Simulated
    # here by hiding tomllib and putting a stand-in tomli on the path.
    (tmp_path / "tomli.py").write_text(
        "TOMLDecodeError = ValueError\ndef loads(text):\n    return {'read_by': 'tomli'}\n"
    )
    (tmp_path / "c.toml").write_text("steps = 3\n")
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["tomllib"] = None  # import tomllib now raises ImportError
        sys.path.insert(0, {str(tmp_path)!r})
        from dcgen.train.config import read_config_file
        print(read_config_file({str(tmp_path / "c.toml")!r}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "{'read_by': 'tomli'}"
