"""espnet-fusionformer: FusionFormer (arXiv 2210.17079) as an ESPnet encoder plugin."""

import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop
from setuptools.command.editable_wheel import editable_wheel

HOOK = "espnet_fusionformer_hook.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class _BuildPyWithHook(build_py):
    """Put the ``.pth`` import hook at the root of the wheel (site-packages)."""

    def run(self) -> None:
        super().run()
        shutil.copy(os.path.join(HERE, HOOK), os.path.join(self.build_lib, HOOK))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [
            os.path.join(self.build_lib, HOOK)
        ]


class _EditableWheelWithHook(editable_wheel):
    """``pip install -e .``: put the hook at the root of the editable wheel too."""

    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(
            dist_name, unpacked_wheel, build_lib, tmp_dir
        )
        shutil.copy(os.path.join(HERE, HOOK), os.path.join(unpacked_wheel, HOOK))
        return result


class _DevelopWithHook(develop):
    """Legacy ``setup.py develop`` installs: copy the hook next to the egg-link."""

    def run(self) -> None:
        super().run()
        shutil.copy(os.path.join(HERE, HOOK), os.path.join(self.install_dir, HOOK))


setup(
    name="espnet-fusionformer",
    version="0.1.0",
    description="FusionFormer encoder (BatchNorm fused into weights) for ESPnet",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["espnet_fusionformer", "espnet_fusionformer.*"]),
    install_requires=[
        "espnet==202511",
        "torch==2.11.0",
        "torchaudio==2.11.0",
        "espnet-model-zoo==0.1.7",
        "kaldiio>=2.18",
        "pyyaml>=6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "tensorboard>=2.14",
    ],
    extras_require={
        "test": ["pytest>=8", "ruff==0.17.6"],
        "export": ["onnx>=1.16", "onnxruntime>=1.18"],
        "int8": ["onnx>=1.16", "onnxruntime>=1.18", "editdistance"],
        "bench": ["onnx>=1.16", "onnxruntime>=1.18", "matplotlib>=3.7"],
        "upload": ["huggingface_hub>=0.20"],
    },
    entry_points={
        "console_scripts": [
            "fusionformer-bench=espnet_fusionformer.bench:main",
            "fusionformer-export=espnet_fusionformer.export:main",
            "fusionformer-int8-cer=espnet_fusionformer.quantize:main",
            "fusionformer-stream-decode=espnet_fusionformer.stream_decode:main",
        ]
    },
    cmdclass={
        "build_py": _BuildPyWithHook,
        "editable_wheel": _EditableWheelWithHook,
        "develop": _DevelopWithHook,
    },
)
