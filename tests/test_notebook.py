"""The Colab notebook runs end to end on the CPU with a shortened config, so it cannot rot."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_notebook_is_generated_from_its_source():
    nbformat = pytest.importorskip("nbformat")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_nb", REPO / "notebooks" / "make_colab_tpu_demo.py")
    make_nb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_nb)
    on_disk = nbformat.read(REPO / "notebooks" / "colab_tpu_demo.ipynb", as_version=4)
    assert [c.source for c in on_disk.cells] == [c.source for c in make_nb.build().cells]


@pytest.mark.slow
@pytest.mark.notebook
def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("GRC_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("GRC_REPO", str(REPO))
    monkeypatch.setenv("GRC_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    nb = nbformat.read(REPO / "notebooks" / "colab_tpu_demo.ipynb", as_version=4)
    resources = {"metadata": {"path": str(tmp_path)}}
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources=resources).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "backend: cpu" in outputs
    assert "memories of 4 slots" in outputs
    assert "Qwen3ForCausalLM loaded with" in outputs
    assert (tmp_path / "run" / "hf_export" / "grc_config.json").is_file()


@pytest.mark.subprocess
def test_setup_cells_import_the_checkout_even_when_it_is_named_grc_jax(tmp_path):
    """Colab clones the project into ./grc_jax: that directory must not shadow the package."""
    import json
    import subprocess
    import sys

    cells = json.loads((REPO / "notebooks" / "colab_tpu_demo.ipynb").read_text())["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"][:2]  # settings, install
    (tmp_path / "grc_jax").symlink_to(REPO, target_is_directory=True)
    script = "\n".join(code + ["from grc_jax import train", "print(train.__file__)"])
    # -S with site-packages on PYTHONPATH: the installed packages without this project's editable
    # install (.pth files are not read), as in a kernel that was running before the install.
    site_packages = os.pathsep.join(p for p in sys.path if p.endswith("site-packages"))
    env = {**os.environ, "GRC_NOTEBOOK_SMOKE": "1", "GRC_REPO": "grc_jax", "PYTHONPATH": site_packages}
    result = subprocess.run(
        [sys.executable, "-S", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith(str(Path("grc_jax") / "train.py"))
