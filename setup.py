"""espnet-fusionformer: FusionFormer (arXiv 2210.17079) as an ESPnet encoder plugin."""

import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.develop import develop
from setuptools.command.editable_wheel import editable_wheel

HOOK = "espnet_fusionformer_hook.pth"
HERE = os.path.dirname(os.path.abspath(__file__))

ONNX = "onnx>=1.16"
# Optional parts; the core (the encoder, fuse(), streaming, stream_decode) needs none.
EXTRAS = {
    # ESPnet's trainer with its defaults (--use_tensorboard true, --use_matplotlib
    # true), as asr.sh runs it; ESPnet has them in its own "train" extra
    "train": ["matplotlib>=3.7", "tensorboard>=2.14"],
    # Speech2Text.from_pretrained / espnet_model_zoo on packed models
    "zoo": ["espnet-model-zoo>=0.1.7"],
    # export: onnx for torch's ONNX exporter, ONNX Runtime to verify the file. Its
    # wheels need numpy >= 1.24.2, so none installs with espnet 202506 (numpy < 1.24;
    # the tests skip the ONNX Runtime checks there); espnet >= 202509 needs numpy 2,
    # which onnxruntime supports from 1.19.
    "export": [ONNX, "onnxruntime>=1.19"],
    # int8 deploy (espnet_fusionformer.quantize): ONNX Runtime's dynamic quantization
    # of the exported fused encoder; fusionformer-int8-cer scores with ESPnet's
    # editdistance dependency
    "int8": [ONNX, "onnxruntime>=1.19"],
    # the benchmark's chart (it times ONNX Runtime too where "export" is installed)
    "bench": ["matplotlib>=3.7"],
    # the recipe's Hugging Face upload (stage 15)
    "upload": ["huggingface_hub>=0.20"],
}
# the recipe (egs2/espeak/asr1): training with ESPnet's defaults, packed-model check
EXTRAS["recipe"] = sorted(set(EXTRAS["train"] + EXTRAS["zoo"]))
# the test suite and CI's lint (onnx: the export tests export without onnxruntime
# too); with "export" too, nothing is skipped
EXTRAS["test"] = sorted(
    {r for name in ("train", "zoo", "bench", "upload") for r in EXTRAS[name]}
    | {ONNX, "pytest>=8", "pyyaml>=6.0.1", "ruff==0.17.6"}
)


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
    # Ranges, not pins: the package installs into the user's ESPnet environment
    # and leaves espnet/torch/torchaudio alone when they satisfy these. The lower
    # bounds are the oldest set CI tests (constraints/oldest.txt); the newest tested
    # set is constraints/newest.txt (what install.sh installs).
    install_requires=[
        "espnet>=202506",  # espnet2's AbsEncoder, conformer layers, tasks, Speech2Text
        "torch>=2.6.0",
        # espnet2.tasks.asr imports torchaudio, but espnet does not require it
        "torchaudio>=2.6.0",
        "numpy>=1.23.5",  # stream_decode (espnet 202506 caps numpy < 1.24)
        "tqdm>=4.60",  # progress bars of the bench and stream_decode CLIs
    ],
    extras_require=EXTRAS,
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
