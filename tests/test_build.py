"""dcgen._C build facts, and the promise that dcgen works without the extension."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import dcgen
from dcgen.ops import has_kernel


def test_build_info_matches_registered_kernels():
    info = dcgen.build_info()
    if not info["extension"]:
        pytest.skip(f"dcgen._C not built: {info['error']}")
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0], (
        "dcgen._C was built against another torch; rebuild it"
    )
    for entry in info["kernels"]:
        name, device = entry.split(":")
        assert has_kernel(name, device), f"build_info lists {entry} but no kernel is registered"
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build must report its archs"
        assert any(k.endswith(":cuda") for k in info["kernels"])


def test_without_extension_every_op_falls_back_to_reference():
    # Blocking the import reproduces a machine where the extension was not built.
    code = """
import sys, json
sys.modules["dcgen._C"] = None
import torch, dcgen
from dcgen.ops import channel_rms_norm, channel_rms_norm_reference, has_kernel
x = torch.randn(2, 8, 4, 4); w = torch.randn(8); b = torch.randn(8)
assert not has_kernel("channel_rms_norm", "cpu")
assert torch.equal(channel_rms_norm(x, w, b), channel_rms_norm_reference(x, w, b))
print(json.dumps(dcgen.build_info()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["extension"] is False and info["error"]
