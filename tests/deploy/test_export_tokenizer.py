"""`meerkat export` writes a tokenizer that transformers 5.x (installed) and 4.46 (a downloaded wheel, run in a
subprocess with PYTHONPATH pointing at it) both load, with the source tokenizer's token ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from deploytools import REPO  # isort: skip
from clienttoy import Toy, build_toy  # isort: skip

from coordinator.export import export_merged
from shared.maskfile import load_mask
from shared.sidecar import initial_values_from_dir

TEXTS = ["the good movie was fine", "the awful plot", "cast"]
# transformers 4.46.3 and what its import checks (tokenizers < 0.21, huggingface_hub < 1.0 + requests)
OLD = ["transformers==4.46.3", "tokenizers==0.20.3", "huggingface_hub==0.36.0", "requests==2.32.3", "urllib3==2.2.3",
       "charset_normalizer==3.4.0", "certifi", "idna"]
PROBE = """import json, sys
from transformers import AutoTokenizer, __version__
t = AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps({"version": __version__, "ids": [t(x)["input_ids"] for x in json.loads(sys.argv[2])]}))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Toy, Path]:
    root = tmp_path_factory.mktemp("tok")
    toy = build_toy(root / "toy")
    mask = load_mask(toy.mask_path, expected_fingerprint=toy.fingerprint)
    values = initial_values_from_dir(toy.model_dir, mask.layers)
    return toy, export_merged(toy.model_dir, mask, values, "nf4", root / "export")


def _ids(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(model_dir))
    return [list(t(x)["input_ids"]) for x in TEXTS]


def test_export_tokenizer_loads_with_installed_transformers(exported: tuple[Toy, Path]) -> None:
    toy, out = exported
    conf = json.loads((out / "tokenizer_config.json").read_text())
    assert conf.get("tokenizer_class") != "TokenizersBackend" and (out / "tokenizer.json").is_file()
    assert _ids(out) == _ids(toy.model_dir)


@pytest.fixture(scope="module")
def transformers_446(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tf446")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(d / "wheels"), *OLD],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"transformers 4.46.3 wheels not available here: {r.stderr.strip()[-300:]}")
    for whl in (d / "wheels").glob("*.whl"):
        with zipfile.ZipFile(whl) as z:
            z.extractall(d / "site")
    return d / "site"


@pytest.mark.slow
def test_export_tokenizer_loads_with_transformers_4_46(exported: tuple[Toy, Path], transformers_446: Path) -> None:
    toy, out = exported
    env = dict(os.environ, PYTHONPATH=str(transformers_446))
    r = subprocess.run([sys.executable, "-c", PROBE, str(out), json.dumps(TEXTS)], env=env, capture_output=True,
                       text=True, timeout=180, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["version"] == "4.46.3" and got["ids"] == _ids(toy.model_dir)
    # the source tokenizer as transformers 5 saved it is what 4.46 cannot read: the fix is what makes this pass
    r = subprocess.run([sys.executable, "-c", PROBE, str(toy.model_dir), json.dumps(TEXTS)], env=env,
                       capture_output=True, text=True, timeout=180, cwd=REPO)
    if json.loads((toy.model_dir / "tokenizer_config.json").read_text()).get("tokenizer_class") == "TokenizersBackend":
        assert r.returncode != 0 and "TokenizersBackend" in r.stderr
