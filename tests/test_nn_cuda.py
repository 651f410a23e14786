"""VNMLinear and sparsified models on a GPU (skipped without a GPU and a CUDA build)."""

import copy

import pytest
import torch
from torch import nn

import vnm
from vnm import SparsifyConfig, VNMLinear
from _models import output_tensor, tiny_llama
from _util import needs_cuda, rel_err

pytestmark = needs_cuda


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_module_on_gpu_matches_cpu_reference(dtype):
    lin = nn.Linear(200, 136).to(dtype)
    cpu = VNMLinear.from_linear(lin, pattern="64:2:8")
    gpu = copy.deepcopy(cpu).cuda()
    assert gpu._packed is not None and gpu._packed.device.type == "cuda"
    x = torch.randn(3, 37, 200).to(dtype)
    y = torch.full((3, 37, 136), float("nan"), dtype=dtype, device="cuda")  # poisoned
    y.copy_(gpu(x.cuda()))
    assert not y.isnan().any()
    assert rel_err(y.cpu(), cpu(x)) < 1e-2


def test_packed_form_follows_dtype_moves_and_state_dict():
    layer = VNMLinear.from_linear(nn.Linear(64, 64), pattern="16:2:8").cuda()
    assert layer._packed is None  # fp32: the kernel runs fp16 / bf16 only
    layer = layer.half()
    assert layer._packed is not None and layer._packed.dtype == torch.float16
    other = VNMLinear.from_linear(nn.Linear(64, 64), pattern="16:2:8").half().cuda()
    other.load_state_dict(layer.state_dict())
    x = torch.randn(5, 64, device="cuda", dtype=torch.float16)
    assert torch.equal(other(x), layer(x))


def test_cuda_graph_capture_and_compile():
    model = nn.Sequential(VNMLinear.from_linear(nn.Linear(128, 256), pattern="64:2:8"), nn.GELU(),
                          VNMLinear.from_linear(nn.Linear(256, 128), pattern="2:4")).half().cuda()
    x = torch.randn(16, 128, device="cuda", dtype=torch.float16)
    ref = model(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        model(x)  # warm-up on the side stream
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = model(x)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)
    compiled = torch.compile(model, fullgraph=True)
    assert torch.allclose(compiled(x), ref)


def test_sparsified_llama_on_gpu_matches_cpu_and_saves(tmp_path):
    dense, inputs = tiny_llama()
    sparse = copy.deepcopy(dense)
    vnm.sparsify(sparse, SparsifyConfig(pattern="16:2:8", permute="all", permute_time_budget=0.2, progress=False))
    gpu = copy.deepcopy(sparse).half().cuda()
    with torch.no_grad():
        y_gpu = output_tensor(gpu(**{k: v.cuda() for k, v in inputs.items()})).float().cpu()
        y_cpu = output_tensor(sparse.half()(**inputs)).float()  # the C++ reference in fp16
    assert rel_err(y_gpu, y_cpu) < 2e-2
    path = vnm.save(gpu, tmp_path / "g.safetensors")
    loaded = vnm.load(path, tiny_llama()[0].half()).cuda()
    with torch.no_grad():
        assert torch.equal(output_tensor(loaded(**{k: v.cuda() for k, v in inputs.items()})).float().cpu(), y_gpu)
