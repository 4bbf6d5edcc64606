"""Install metadata and CI command: no torch cap in the package, pins where they belong, warning filters that match."""
from __future__ import annotations

import builtins
import importlib
import importlib.util
import io
import re
import tomllib
import warnings
from pathlib import Path

import torch
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement(name: str) -> Requirement:
    requirements = [Requirement(text) for text in PYPROJECT["project"]["dependencies"]]
    return next(req for req in requirements if req.name == name)


def _upper_bounds(req: Requirement) -> list[str]:
    return [str(spec) for spec in req.specifier if spec.operator in ("<", "<=", "==", "~=", "===")]


def test_torch_has_no_upper_bound_in_any_requirement() -> None:
    """A cap makes pip replace a GPU user's newer torch; the CPU pin belongs in the install command."""
    extras = [Requirement(text) for texts in PYPROJECT["project"]["optional-dependencies"].values() for text in texts]
    for req in [Requirement(text) for text in PYPROJECT["project"]["dependencies"]] + extras:
        if req.name == "torch":
            assert not _upper_bounds(req), f"torch requirement {req} caps the version"


def test_jsonargparse_is_kept_below_5() -> None:
    """LightningCLI already warns about jsonargparse 5.0 removals."""
    assert "<5" in [str(spec) for spec in _requirement("jsonargparse").specifier]


def test_ci_and_readme_install_the_fid_extra_with_pinned_cpu_torch() -> None:
    """The Inception FID path runs in CI: the test command installs `[test,fid]` with torch pinned in the same call."""
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = re.compile(r"pip install -q torch==2\.13\.0 -e \"\.\[test,fid\]\"")
    assert command.search(ci), ci
    assert command.search(readme)
    ci_command = ci.strip().splitlines()[-1]
    assert ci_command in readme.splitlines(), "CI must run exactly the README's test command"
    assert "--no-deps k-diffusion" in ci_command  # the cross-check against k-diffusion's own samplers runs in CI


def _category(name: str) -> type:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module) if module else builtins, attr)


def test_every_filterwarnings_entry_matches_the_warning_it_names() -> None:
    """Each ignore entry names an existing warning class, and those with a message match the real warning's text
    and category (checked by raising it: Lightning's LeafSpec use, torch.jit's deprecations)."""
    from pytorch_lightning.utilities._pytree import _tree_flatten

    def jit_load() -> None:
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(torch.nn.Identity()), buffer)
        buffer.seek(0)
        torch.jit.load(buffer)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _tree_flatten(1)
        jit_load()
    raised = [(str(w.message), w.category) for w in caught]
    for entry in PYPROJECT["tool"]["pytest"]["ini_options"]["filterwarnings"]:
        action, message, category, *module = entry.split(":")
        cls = _category(category)
        assert action == "ignore" and issubclass(cls, Warning), entry
        if message:
            matched = [text for text, raised_cls in raised if re.match(message, text) and issubclass(raised_cls, cls)]
            assert matched, f"filterwarnings entry {entry!r} matches none of {raised}"
        else:
            assert module and importlib.util.find_spec(module[0]) is not None, entry  # a class-wide entry names its module


def test_readme_commands_write_only_into_ignored_folders():
    """Outputs of the documented commands (--out, --outdir, --model.output) land in git-ignored folders, never
    untracked in the repository root (`ref.npz` did)."""
    ignored = {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    for doc in ("README.md", "docs/sampling.md"):
        text = (ROOT / doc).read_text()
        outputs = re.findall(r"--(?:out|outdir|model\.output)[ =]([^\s\]|`]+)", text)
        assert outputs, doc
        for path in outputs:
            assert path.split("/")[0] in ignored, f"{doc}: {path} is not in an ignored folder"
