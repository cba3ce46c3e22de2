import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

INSTALL = '''# Install (Colab) / path set-up (local). Colab keeps its own CUDA torch: requirements-colab.txt has no torch.
import os, sys, subprocess
if "google.colab" in sys.modules and not os.path.exists("mpi"):
    subprocess.run(["git", "clone", "-q", "https://github.com/mpi-course/mpi"], check=True); os.chdir("mpi")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r", "requirements-colab.txt"], check=True)
if os.path.basename(os.getcwd()) == "notebooks": os.chdir("..")
sys.path.insert(0, os.getcwd())'''


def badge(name):
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/github/mpi-course/mpi/blob/main/notebooks/{name})")


def make(name, title, learn, cells, path):
    """cells: list of ("md"|"code"|"mirror", source)."""
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["accelerator"] = "GPU"
    nb.metadata["colab"] = {"provenance": [], "gpuType": "T4"}
    out = [new_markdown_cell(badge(name) + f"\n\n# {title}"), new_markdown_cell("## What you will learn\n\n" + learn),
           new_code_cell(INSTALL)]
    for kind, src in cells:
        if kind == "md":
            out.append(new_markdown_cell(src))
        else:
            cell = new_code_cell(src)
            if kind == "mirror":
                cell.metadata["tags"] = ["mirror"]
            out.append(cell)
    nb.cells = out
    nbformat.write(nb, path)
