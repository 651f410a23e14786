"""The README's Python examples run as written, each on its own (the recovery run shortened)."""

import re
from pathlib import Path

import pytest
import torch

from _util import needs_smollm2

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



@pytest.mark.slow
@needs_smollm2
def test_readme_llm_recovery_example_runs():
    """The LLM snippet on the real SmolLM2, shortened (2 calibration windows of 64 tokens, 3 training
    steps); every decoder linear layer ends 64:2:5 sparse and the model still predicts."""
    blocks = python_blocks()
    assert len(blocks) >= 3, "README lost its LLM example"
    llm = blocks[2]
    short = llm.replace("count=32, length=256", "count=2, length=64").replace("total_steps=450", "total_steps=3")
    assert short.count("count=2, length=64") == 1 and "total_steps=3" in short, "the README's LLM example changed"
    import vnm

    torch.manual_seed(0)
    scope = {}
    exec(compile(short, str(README), "exec"), scope)  # noqa: S102 - the README is ours
    model = scope["model"]
    sparse = [m for m in model.modules() if isinstance(m, vnm.VNMLinear)]
    assert len(sparse) == 7 * model.config.num_hidden_layers  # q k v o gate up down of every block
    assert not any(isinstance(m, vnm.train.LoRASparseLinear) for m in model.modules())
    with torch.no_grad():
        logits = model(input_ids=scope["windows"][0]["input_ids"][:, :32]).logits
    assert torch.isfinite(logits).all()


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
