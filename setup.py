"""fmpsr: Flexible Meta Pruning (and friends) for image super-resolution, as a BasicSR plug-in."""
from setuptools import find_packages, setup

ONNX = ['onnx>=1.15', 'onnxruntime>=1.17', 'onnxscript']
# model files from the ecosystem in (fmpsr/archs/spandrel_arch.py): the loader chaiNNer / ComfyUI use
SPANDREL = ['spandrel>=0.4.2']

setup(
    name='fmpsr',
    version='0.1.0',
    description='Prune image super-resolution networks (FMP, DHP, ...) inside BasicSR',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['fmpsr', 'fmpsr.*']),
    python_requires='>=3.9',
    install_requires=[
        'basicsr==1.4.2',
        # weights_only=True loading is unsafe before 2.10 (CVE-2025-32434, CVE-2026-24747);
        # fmpsr.requirements stops the import on an older torch
        'torch>=2.10',
        'packaging',  # torch version check (fmpsr.requirements)
        'torchvision',
        'safetensors>=0.4',
        'scikit-image',
        'scipy',  # connected components of the channel-tie graph (fmpsr.pruning.coupling)
        'pyyaml',
        'tqdm',
        'lmdb',
        'opencv-python',
        'tensorboard',
        'torch-pruning>=1.6,<1.7',  # DependencyGraph for automatic channel coupling (fmpsr.pruning.coupling)
        'matplotlib',  # the methods' figures (SRP Fig. 3, ISS-P dynamics), benchmark and comparison plots
        'networkx',  # WS-flex relational-graph kernel masks (fmpsr.pruning.kernel_masks)
    ],
    extras_require={
        'onnx': ONNX,
        'spandrel': SPANDREL,
        # the ONNX export and the spandrel loader are tested in CI, so the test extra carries them
        'test': ['pytest', 'hypothesis'] + ONNX + SPANDREL,
    },
    entry_points={'console_scripts': [
        'fmpsr-infer = fmpsr.deploy.inference:cli',
        'fmpsr-export-onnx = fmpsr.deploy.onnx_export:cli',
    ]},
    license='Apache-2.0',
)
