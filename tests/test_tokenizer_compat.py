"""The bundle's tokenizer and config load in the TensorRT-LLM image's transformers (4.57.1).

The project saves bundles with transformers 5.x; the gpu image carries TensorRT-LLM's
pinned transformers 4.57.1 (TensorRT-LLM requirements.txt). A separate virtual
environment with that release from PyPI is created under build/compat/ on the first
run and reused afterwards; the tests run the real 4.57.1 code in it, so they fail if
the bundle stops loading there or renders the chat template differently.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from build_engines import bundle_compat as bundle_mod

ROOT = Path(__file__).resolve().parent.parent
COMPAT_TRANSFORMERS = "4.57.1"
COMPAT_VENV = ROOT / "build" / "compat" / f"transformers-{COMPAT_TRANSFORMERS}"

#: Conversations rendered in both versions: placeholders in text, content parts, a system turn.
CONVERSATIONS = [
    [{"role": "user", "content": "Describe <image> and answer <audio>"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}, {"type": "audio"}]},
    ],
    [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi, how can I help?"},
        {"role": "user", "content": "Tell me about <image> in one sentence."},
    ],
]

# Runs in either interpreter: loads the tokenizer and config, renders every conversation.
PROBE = """
import json, sys
from transformers import AutoConfig, AutoTokenizer
import transformers
path, conversations = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(path)
ids = [[int(i) for i in tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)]
       for c in conversations]
config = AutoConfig.from_pretrained(path)
print(json.dumps({
    "version": transformers.__version__,
    "class": type(tok).__name__,
    "ids": ids,
    "special": sorted(tok.all_special_tokens),
    "size": len(tok),
    "rope_theta": getattr(config, "rope_theta", None),
}))
"""


def _compat_python() -> Path:
    """The transformers 4.57.1 interpreter, creating its venv from PyPI the first time."""
    python = COMPAT_VENV / "bin" / "python"
    check = [
        str(python),
        "-c",
        f"import transformers, jinja2; assert transformers.__version__ == {COMPAT_TRANSFORMERS!r}",
    ]
    if python.exists() and subprocess.run(check, capture_output=True, check=False).returncode == 0:
        return python
    shutil.rmtree(COMPAT_VENV, ignore_errors=True)
    venv.EnvBuilder(with_pip=True).create(COMPAT_VENV)
    # transformers brings its own tokenizers pin; jinja2 renders chat templates.
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", f"transformers=={COMPAT_TRANSFORMERS}", "jinja2"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if install.returncode != 0:
        pytest.fail(
            f"cannot install transformers=={COMPAT_TRANSFORMERS} from PyPI into {COMPAT_VENV}:\n{install.stderr}"
        )
    return python


def _probe(python: str | Path, llm_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-c", PROBE, str(llm_dir), json.dumps(CONVERSATIONS)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _result(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compat_python() -> Path:
    return _compat_python()


def test_bundle_tokenizer_renders_the_same_ids_in_4_57(bundle_dir: Path, compat_python: Path) -> None:
    llm = bundle_dir / "llm"
    ours = _result(_probe(sys.executable, llm))
    theirs = _result(_probe(compat_python, llm))
    assert theirs["version"] == COMPAT_TRANSFORMERS and ours["version"] != COMPAT_TRANSFORMERS
    assert theirs["class"] == "PreTrainedTokenizerFast"
    assert theirs["ids"] == ours["ids"]
    assert theirs["special"] == ours["special"] and theirs["size"] == ours["size"]
    # The placeholders stay single special tokens in both (preprocessing swaps them for table rows).
    ids = json.loads((bundle_dir / "bundle.json").read_text())["token_ids"]
    assert ids["image"] in theirs["ids"][0] and ids["audio"] in theirs["ids"][0]


def test_an_unconverted_tokenizer_config_fails_in_4_57(bundle_dir: Path, compat_python: Path, tmp_path: Path) -> None:
    """What transformers 5 writes on its own does not load there (the failure this fix is for)."""
    llm = tmp_path / "llm"
    shutil.copytree(bundle_dir / "llm", llm)
    path = llm / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "TokenizersBackend"
    config["extra_special_tokens"] = config.pop("additional_special_tokens")
    path.write_text(json.dumps(config))
    proc = _probe(compat_python, llm)
    assert proc.returncode != 0 and "TokenizersBackend does not exist" in proc.stderr
    assert not bundle_mod._is_portable(llm)
    bundle_mod._make_tokenizer_portable(llm)
    assert _result(_probe(compat_python, llm))["class"] == "PreTrainedTokenizerFast"


def test_rope_theta_reaches_4_57(bundle_dir: Path, compat_python: Path, tmp_path: Path) -> None:
    """4.57 reads the top-level rope_theta; with only rope_parameters it falls back to 10000."""
    llm = tmp_path / "llm"
    shutil.copytree(bundle_dir / "llm", llm)
    path = llm / "config.json"
    config = json.loads(path.read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    config["rope_parameters"]["rope_theta"] = 500000.0
    del config["rope_theta"]
    path.write_text(json.dumps(config))
    assert _result(_probe(compat_python, llm))["rope_theta"] == 10000.0
    assert not bundle_mod._is_portable(llm)
    bundle_mod._make_config_portable(llm)
    assert bundle_mod._is_portable(llm)
    assert _result(_probe(compat_python, llm))["rope_theta"] == 500000.0
