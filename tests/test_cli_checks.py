"""Bad command-line input is named in one line (exit 2, no traceback) before any model loads or
any work starts: the checks each command makes up front, on stand-in files and folders."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dcgen._files import atomic_write
from dcgen.cli import main


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Stand-ins: prompt embeddings, a file, a folder, a pipeline folder's broken variants."""
    embeds = tmp_path / "prompt.safetensors"
    save_file({"prompt_embeds": torch.zeros(1, 4, 8), "pooled_prompt_embeds": torch.zeros(1, 8)},
              str(embeds))  # fmt: skip
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    folders = {}
    for name, index, transformer in (("list_index", "[1, 2]", True), ("bad_json", "{bad", True),
                                     ("no_transformer", '{"_class_name": "DCGenFluxPipeline"}',
                                      False)):  # fmt: skip
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model_index.json").write_text(index)
        if transformer:
            (folder / "transformer").mkdir()
            (folder / "transformer" / "config.json").write_text("{}")
        folders[name] = folder
    config = tmp_path / "stage.toml"
    config.write_text('transformer = "t"\ncache_dir = "c"\nout_dir = "o"\n')
    return {"embeds": embeds, "file": a_file, "tmp": tmp_path, "config": config, **folders}


CASES = [
    # generate: pipeline folders that cannot be one
    ("generate --pipeline {list_index} --prompt-embeds {embeds} --device cpu --out {tmp}/x.png",
     "model_index.json: expected a JSON object with _class_name, got list"),
    ("generate --pipeline {bad_json} --prompt-embeds {embeds} --device cpu --out {tmp}/x.png",
     "model_index.json: not valid JSON"),
    ("generate --pipeline {no_transformer} --prompt-embeds {embeds} --device cpu --out {tmp}/x.png",
     "no transformer/config.json: not a complete pipeline folder"),
    # quantize / convert-quantized outputs and options
    ("quantize --pipeline {list_index} --format fp8-row --no-report --caption c --device cpu "
     "--out {tmp}/q.safetensors", "--caption picks an entry of a --prompt-embeds table"),
    ("quantize --pipeline {list_index} --format fp8-row --no-report --device cpu "
     "--out {file}/q.safetensors", "a_file is a file, not a folder"),
    ("convert-quantized {embeds} --pipeline {tmp} --out {tmp}/c.png",
     "--out .*c.png: expected a .safetensors file name"),
    # export: everything checked before the transformer loads
    ("export --transformer {tmp} --dcae {tmp} --out {tmp}/e --shift -2", "--shift: expected a positive"),
    ("export --transformer {tmp} --dcae {tmp} --out {tmp}/e --lora-scale 3",
     "--lora-scale goes with --lora DIR"),
    ("export --transformer {tmp} --dcae {tmp} --out {tmp}/e --lora {tmp} --lora-scale nan",
     "--lora-scale: expected a finite number, got nan"),
    ("export --transformer {tmp} --dcae {tmp} --out {tmp}/e --link-text-encoders",
     "--link-text-encoders goes with --text-encoders DIR"),
    ("export --transformer {tmp} --dcae {tmp}/nope --out {tmp}/e", "--dcae .*nope: no such file"),
    ("export --transformer {tmp} --dcae {tmp} --out {file}", "expected a folder to write into"),
    # the stage commands set their stage; --set errors name --set
    ("align --config {config} --set stage=finetune", "--set stage: the command sets the stage"),
    ("output --config {config} --set steps=abc", "stage.toml with --set: steps: expected"),
    # precompute: before the DC-AE and the text encoders load
    ("precompute --data {tmp}/nope --dcae {tmp} --out {tmp}/c", "--data .*: the folder does not exist"),
    ("precompute --data {tmp} --dcae {tmp} --out {tmp}/c --shard-size 0",
     "--shard-size: expected an integer >= 1, got 0"),
    ("precompute --data {tmp} --dcae {tmp} --out {tmp}/c --num-workers -1",
     "--num-workers: expected an integer >= 0, got -1"),
    ("precompute --data {tmp} --dcae {tmp} --out {file}", "expected a folder to write into"),
    # demos, convert-dcae, bench
    ("demo --fast --scale 0 --out {tmp}/d", "--scale: expected a positive number, got 0"),
    ("demo --fast --scale nan --out {tmp}/d", "--scale: expected a positive number, got nan"),
    ("demo-dcae --steps -1 --out {tmp}/d", "--steps: expected an integer >= 0, got -1"),
    ("demo-dcae --image {embeds} --out {tmp}/d", "--image .*: not an image"),
    ("convert-dcae {embeds} {tmp}/dc", "pass --preset NAME"),
    ("bench --model tiny --quick --device cpu --variants graphs --out {tmp}/b",
     "--variants graphs replays CUDA graphs: it needs a CUDA device"),
    ("bench --model tiny --quick --device cpu --fp8-fast-accum --out {tmp}/b",
     "--fp8-granularity and --fp8-fast-accum go with --fp8"),
    ("bench --model tiny --quick --device cpu --out {file}",
     "--out .*a_file: expected a folder to write into, it is a file"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "match"), CASES, ids=[c[0].split()[0] for c in CASES])
def test_bad_input_is_named_up_front(files, capsys, argv, match):
    args = [a.format(**files) for a in argv.split()]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert re.search(match, captured.err), captured.err
    assert "Traceback" not in captured.err
    assert not (files["tmp"] / "d").exists() and not (files["tmp"] / "e").exists()


def test_atomic_writes_get_the_mode_of_a_new_file(tmp_path):
    """A PNG, checkpoint or report renamed into place is readable as any new file is (the temp
    file it was written to is created private, 0600)."""
    mask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "out.json", lambda tmp: Path(tmp).write_text(json.dumps({})))
        plain = tmp_path / "plain"
        plain.write_text("")
    finally:
        os.umask(mask)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o644
    assert plain.stat().st_mode & 0o777 == 0o644
