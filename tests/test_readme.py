"""The README's Python examples run as written (with a shorter recovery run)."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 2, "README lost its Python examples"
    code = "\n".join(blocks)
    assert "total_steps=1000" in code
    code = code.replace("total_steps=1000", "total_steps=4")  # same code path, test-sized
    monkeypatch.chdir(tmp_path)  # vnm.save writes into the working directory
    torch.manual_seed(0)
    scope = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - the README is ours
    import vnm

    assert (tmp_path / "minilm-64-2-8.safetensors").exists()
    assert any(isinstance(m, vnm.VNMLinear) for m in scope["model"].modules())
    assert not any(isinstance(m, vnm.train.LoRASparseLinear) for m in scope["model"].modules())


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
