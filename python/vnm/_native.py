"""The compiled core (``vnm._C``), imported once, with a clear error when it is missing."""

from __future__ import annotations

try:
    from . import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "vnm's compiled extension (vnm._C) could not be imported: "
        f"{exc}. Install the package with `pip install .` from the repository root "
        "(a source checkout on sys.path has no compiled core)."
    ) from exc

CUDA_BUILT: bool = bool(_C.cuda_built)
