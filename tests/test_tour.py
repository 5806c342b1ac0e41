"""examples/tour.ipynb runs top to bottom: the tutorial breaks when the API it shows does.

The notebook runs in a Jupyter kernel of this very interpreter (a kernel spec written for sys.executable
into a temporary folder, so that no installed `python3` kernel of another environment is picked up),
from the repository root, with this process's environment ($PPL_MODELS_DATA included)."""

from pathlib import Path

import nbformat
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
TOUR = ROOT / "examples" / "tour.ipynb"
CELL_TIMEOUT_S = 300


def test_tour_runs_top_to_bottom(tmp_path):
    write_kernel_spec(tmp_path / "kernels" / "this-python", extra_arguments=["--InteractiveShell.colors=nocolor"])
    kernels = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    notebook = nbformat.read(TOUR, as_version=4)
    kernel = KernelManager(kernel_name="this-python", kernel_spec_manager=kernels,
                           transport="ipc", ip=str(tmp_path / "kernel"))  # local sockets, in tmp_path
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, km=kernel, resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute()
    except CellExecutionError as error:  # the failing cell and the kernel's traceback, without nbclient's frames
        raise AssertionError(f"{TOUR.relative_to(ROOT)}: {error}") from None
