"""A built wheel carries the recipes and DeepSpeed configs, and an installed (non-editable) ptscale finds them
through the package, from a working directory outside the checkout."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = {"ptscale/recipes/default.yaml", "ptscale/ds_configs/zero2.json", "ptscale/ds_configs/zero3.json",
        "ptscale/ds_configs/zero3_offload.json"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: setuptools from this environment, nothing downloaded
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, cwd=out, timeout=300)
    (found,) = out.glob("ptscale-*.whl")
    return found


def test_wheel_ships_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert DATA <= names, DATA - names
    assert "ptscale/hub.py" in names and "ptscale_kernels/__init__.py" in names


def test_checkout_ds_configs_is_the_package_copy():
    # one copy of each file in git: the top-level folder the README's commands name is a link to the package's
    assert (ROOT / "ds_configs").is_symlink()
    assert (ROOT / "ds_configs" / "zero3.json").resolve() == (ROOT / "ptscale" / "ds_configs" / "zero3.json")


@pytest.mark.slow
def test_installed_wheel_finds_recipe_and_ds_config(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    code = ("import ptscale; from ptscale.config import DEFAULT_DS, load_recipe; "
            "from ptscale.training.engine import load_ds_template; "
            "cfg = load_recipe(); t = load_ds_template(DEFAULT_DS); "
            "print(ptscale.__file__, DEFAULT_DS, t['zero_optimization']['stage'], cfg.prefix.lengths)")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy, not the checkout
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    module, ds, stage, _ = out.stdout.strip().splitlines()[-1].split(maxsplit=3)  # DeepSpeed may log before it
    assert module.startswith(str(target)) and ds.startswith(str(target)) and stage == "3"
