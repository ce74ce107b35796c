"""Print the facts CMake needs about the installed torch, one `KEY=VALUE` per line
(list values separated by `|`).

Run by CMakeLists.txt with the Python that will import the extension, so the build
always matches the torch it will be loaded into (no find_package(Torch) needed).
"""

import glob
import os
import site
import sys

import torch
import torch.utils.cpp_extension as ext


def _cuda_extra_include_dirs():
    """Folders holding CUDA library headers that ATen's CUDA headers include
    (cusparse.h, cublas_v2.h): the toolkit's own include folder when complete,
    else the nvidia-* wheels that the CUDA build of torch depends on."""
    roots = list(site.getsitepackages()) + [site.getusersitepackages()]
    roots.append(os.path.dirname(os.path.dirname(torch.__file__)))
    found = []
    for root in roots:
        for pattern in ("nvidia/*/include", "nvidia/*/*/include"):
            for d in sorted(glob.glob(os.path.join(root, pattern))):
                if os.path.exists(os.path.join(d, "cusparse.h")) or os.path.exists(
                    os.path.join(d, "cublas_v2.h")
                ):
                    if d not in found:
                        found.append(d)
    return found


def _visible_cuda_archs():
    """Compute capabilities of the GPUs this process sees ("9.0"), oldest first; none
    without a GPU (or where CUDA cannot be initialised)."""
    try:
        if not torch.cuda.is_available():
            return []
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    except Exception:  # a driver problem: build as if no GPU were visible
        return []
    return [f"{major}.{minor}" for major, minor in sorted(caps)]


def main():
    out = {
        "TORCH_VERSION": torch.__version__,
        "TORCH_CUDA_VERSION": torch.version.cuda or "",
        "TORCH_INCLUDE_DIRS": "|".join(ext.include_paths()),
        "TORCH_LIBRARY_DIR": os.path.join(os.path.dirname(torch.__file__), "lib"),
        "TORCH_CXX11_ABI": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
        "TORCH_CUDA_EXTRA_INCLUDE_DIRS": "|".join(_cuda_extra_include_dirs()),
        "PYTHON_EXECUTABLE": sys.executable,
        "VISIBLE_CUDA_ARCHS": "|".join(_visible_cuda_archs()) if torch.version.cuda else "",
    }
    for k, v in out.items():
        print(f"{k}={v}")


if __name__ == "__main__":
    main()
