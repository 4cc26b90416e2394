"""The exported remote code is derived from the imports: an ``ast`` walk of the relative imports of the
Hugging Face wrappers, transitively, with each import rewritten flat for transformers' sibling files."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ditmoe.hf.remote_code import ENTRY_POINTS, required_files, write_remote_code
from ditmoe.model import DiT, get_preset

SYNTHETIC = {
    "hf/modeling.py": '"""Entry."""\nfrom ..model.net import Net\nfrom .configuration import Config\n\n\n'
                      "def build():\n    from ..model.util import (\n        helper,  # imported lazily\n    )\n"
                      "    return Net(Config(), helper)\n",
    "hf/configuration.py": "from ..model.config import BASE\n\n\nclass Config:\n    base = BASE\n",
    "model/__init__.py": "from .net import Net\n",
    "model/net.py": "from .layers import double as twice\n\n\nclass Net:\n"
                    "    def __init__(self, config, helper):\n        self.value = twice(config.base) + helper()\n",
    "model/layers.py": "def double(x):\n    return 2 * x\n",
    "model/config.py": "BASE = 20\n",
    "model/util.py": "def helper():\n    return 2\n",
    "model/unused.py": "from .net import Net\n",
}
ENTRIES = ("hf/modeling.py", "hf/configuration.py")
# Loads an exported folder with transformers only (cwd outside the repository, no PYTHONPATH); prints the
# remote-code files it imported and whether any ditmoe module was loaded.
AUTOMODEL_SCRIPT = """
import sys, torch
from pathlib import Path
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
x, t, y = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(x, t, y), sys.argv[3])
loaded = {Path(m.__file__).name for name, m in list(sys.modules.items())
          if name.startswith("transformers_modules.") and getattr(m, "__file__", None)}
print(sorted(loaded - {"__init__.py"}), any(name.split(".")[0] == "ditmoe" for name in sys.modules))
"""


def make_package(root: Path, files: dict[str, str]) -> Path:
    for relative, source in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(source)
    return root


def test_walk_of_a_synthetic_package(tmp_path):
    from transformers.dynamic_module_utils import get_relative_import_files

    package = make_package(tmp_path / "pkg", SYNTHETIC)
    assert [str(p) for p in required_files(package, ENTRIES)] == [
        "hf/configuration.py", "hf/modeling.py", "model/config.py", "model/layers.py", "model/net.py", "model/util.py"]
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "__init__.py").write_text("")
    names = write_remote_code(flat, package, ENTRIES)
    assert (flat / "modeling.py").read_text().splitlines()[1:3] == ["from .net import Net",
                                                                    "from .configuration import Config"]
    assert "    from .util import helper\n    return" in (flat / "modeling.py").read_text()
    assert "from .layers import double as twice" in (flat / "net.py").read_text()
    needed = {Path(f).name for entry in ("modeling.py", "configuration.py")
              for f in get_relative_import_files(flat / entry)}
    assert set(names) == needed | {"modeling.py", "configuration.py"}
    proc = subprocess.run([sys.executable, "-c", "from flat.modeling import build; print(build().value)"],
                          cwd=tmp_path, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "42"


@pytest.mark.parametrize("source, message", [
    ("import pkg.model.util\n", "must import pkg relatively"),
    ("from pkg.model import util\n", "must import pkg relatively"),
    ("from ..model import util\n", "not a module file of the package"),
    ("from . import configuration\n", "copies only 'from .module import name' imports"),
    ("from ...outside import x\n", "leaves the package"),
    ("from ..model.missing import x\n", "not a module file of the package"),
])
def test_imports_that_cannot_be_flattened(tmp_path, source, message):
    package = make_package(tmp_path / "pkg", {**SYNTHETIC, "hf/modeling.py": source})
    with pytest.raises(ValueError, match=message):
        required_files(package, ENTRIES)


def test_files_that_clash_once_flattened(tmp_path):
    clash = "from .config import x\nfrom ..model.config import BASE\n"
    package = make_package(tmp_path / "pkg", {**SYNTHETIC, "hf/config.py": "", "hf/configuration.py": clash})
    with pytest.raises(ValueError, match=r"distinct names once flattened: \['hf/config.py', 'model/config.py'\]"):
        required_files(package, ENTRIES)


@pytest.mark.slow
def test_exported_folder_holds_exactly_the_code_automodel_imports(tmp_path):
    from transformers.dynamic_module_utils import get_relative_import_files

    from ditmoe.hf.export import export

    torch.manual_seed(0)
    model = DiT(get_preset("tiny")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)  # the zero-initialised output layer would hide wrong weights
    out = tmp_path / "hf"
    export(model, out, objective="ddpm")
    written = sorted(p.name for p in out.glob("*.py"))
    assert written == sorted(p.name for p in required_files())
    assert {"dit.py", "moe.py"} <= set(written) and not any("from .." in (out / n).read_text() for n in written)
    needed = {Path(f).name for entry in ENTRY_POINTS for f in get_relative_import_files(out / Path(entry).name)}
    assert set(written) == needed | {Path(entry).name for entry in ENTRY_POINTS}

    inputs = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 10])
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "load.py").write_text(AUTOMODEL_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"))
    proc = subprocess.run([sys.executable, "load.py", str(out), "inputs.pt", "out.pt"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"{written} False"
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "out.pt"), model(*inputs))
