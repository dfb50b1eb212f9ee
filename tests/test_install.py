"""The installed environment: the plugin, FusionBench, torchvision and open_clip import together."""

import subprocess
import sys


def test_core_packages_import_together():
    code = (
        "import fusion_bench_tsv, fusion_bench, torchvision, open_clip, torch;"
        "from fusion_bench_tsv import TSVMergeAlgorithm;"
        "from fusion_bench import BaseAlgorithm;"
        "assert issubclass(TSVMergeAlgorithm, BaseAlgorithm);"
        "import torchvision.transforms;"
        "print(torch.__version__, torchvision.__version__, open_clip.__version__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch_version, vision_version, _ = proc.stdout.split()
    # torch and torchvision must be one build (a CUDA torchvision beside a CPU torch breaks imports)
    assert torch_version.partition("+")[2] == vision_version.partition("+")[2]


def test_functional_core_does_not_need_fusion_bench():
    code = "import sys, fusion_bench_tsv.functional; assert 'fusion_bench' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fusion_bench_openclip_pools_import_after_our_package():
    """fusion-bench 0.2.33's OpenCLIP code needs typing.override (Python >= 3.12); our compat shim provides it."""
    code = (
        "import fusion_bench_tsv;"
        "from fusion_bench.modelpool import OpenCLIPVisionModelPool;"
        "from fusion_bench.taskpool import OpenCLIPVisionModelTaskPool"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
