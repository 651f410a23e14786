"""Memory and latency of a model, shared by the command line, the demos and bench/ (nothing here
imports the command line, so any of them may import it)."""

from __future__ import annotations

import time

# Untimed calls before a measurement: the first call of a model pays one-time costs (torch imports
# its compiler stack the first time vnm's custom op runs, seconds on a CPU; CUDA builds kernels).
WARMUP_CALLS = 2


def module_bytes(model) -> int:
    """Bytes of parameters and buffers (shared tensors counted once); a sparse weight
    (:class:`vnm.VNMWeight`) counts its canonical arrays, the packed copy is in :func:`held_bytes`."""
    from .weight import VNMWeight  # noqa: PLC0415

    seen, total = set(), 0
    tensors = []
    for t in list(model.parameters()) + list(model.buffers()):
        tensors.extend(t.vnm.arrays().values() if isinstance(t, VNMWeight) else [t])
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def held_bytes(model) -> int:
    """What a model holds in memory: :func:`module_bytes` plus the packed (kernel) copy each
    :class:`VNMLinear` keeps on a CUDA device next to its canonical buffers."""
    from .nn import VNMLinear  # noqa: PLC0415

    total = module_bytes(model)
    for m in model.modules():
        packed = getattr(m, "_packed", None) if isinstance(m, VNMLinear) else None
        if packed is not None:  # its perm is the module's own buffer, counted already
            total += sum(t.numel() * t.element_size() for t in (packed.values, packed.meta, packed.kidx))
    return total


def time_forward(model, batch, repeat: int = 10, warmup: int = WARMUP_CALLS) -> float:
    """Median forward latency in ms over ``repeat`` calls after ``warmup`` untimed ones (CUDA
    events on a GPU, perf_counter on the CPU)."""
    import statistics  # noqa: PLC0415

    import torch  # noqa: PLC0415

    on_gpu = next(iter(batch.values())).is_cuda
    times = []
    with torch.no_grad():
        for i in range(warmup + repeat):
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(**batch)
                end.record()
                torch.cuda.synchronize()
                dt = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                model(**batch)
                dt = (time.perf_counter() - t0) * 1e3
            if i >= warmup:
                times.append(dt)
    return statistics.median(times)
