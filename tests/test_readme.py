"""The README's Python examples run as written, each on its own (the recovery run shortened)."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert len(blocks) >= 2, "README lost its Python examples"
    usage, recovery = blocks[0], blocks[1]
    monkeypatch.chdir(tmp_path)  # vnm.save writes into the working directory
    import vnm

    torch.manual_seed(0)
    scope = {}
    exec(compile(usage, str(README), "exec"), scope)  # noqa: S102 - the README is ours
    assert (tmp_path / "minilm-64-2-8.safetensors").exists()
    assert any(isinstance(m, vnm.VNMLinear) for m in scope["model"].modules())

    # The recovery snippet is standalone (a fresh scope) and sized for a CPU: the same code with
    # 4 steps instead of 300 here.
    assert "total_steps=300" in recovery
    scope = {}
    exec(compile(recovery.replace("total_steps=300", "total_steps=4"), str(README), "exec"), scope)  # noqa: S102
    assert any(isinstance(m, vnm.VNMLinear) for m in scope["model"].modules())
    assert not any(isinstance(m, vnm.train.LoRASparseLinear) for m in scope["model"].modules())
    assert "cosine to dense on held-out text: mean 0." in capsys.readouterr().out


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
