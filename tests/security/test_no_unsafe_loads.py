"""Nothing from the network or a model file is unpickled: no module of the project imports pickle or
calls torch.load / numpy's pickle loading (weights come from safetensors or GGUF, tensors as raw bytes)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNSAFE = re.compile(r"^\s*(import pickle|from pickle|import cPickle|import dill)|torch\.load\(|allow_pickle\s*=\s*True"
                    r"|pickle\.loads?\(", re.M)


def test_no_module_unpickles() -> None:
    sources = [p for d in ("engine", "node", "coordinator", "client", "scripts") for p in (REPO / d).rglob("*.py")]
    assert len(sources) > 40
    found = [f"{p.relative_to(REPO)}: {m.group(0).strip()}" for p in sources for m in UNSAFE.finditer(p.read_text())]
    assert not found, found
