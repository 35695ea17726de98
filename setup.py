import glob

from setuptools import find_packages, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as error:
    raise SystemExit('mmdynconv compiles a CPU extension against torch: install '
                     'torch first, then install mmdynconv with '
                     '--no-build-isolation') from error


def read_version():
    namespace = {}
    with open('mmdynconv/version.py') as f:
        exec(f.read(), namespace)
    return namespace['__version__']


setup(
    name='mmdynconv',
    version=read_version(),
    description='Lightweight dynamic kernels with attention inside (AIK) '
    'for MMDetection and MMPretrain',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmdynconv', 'mmdynconv.*']),
    python_requires='>=3.9',
    # Loose bounds for users who bring their own (e.g. CUDA) stack; the tested
    # pins live in requirements/ and are installed by tools/setup_env.sh.
    install_requires=['torch>=2.0', 'mmengine>=0.10.0', 'mmcv>=2.0.0,<2.2.0',
                      'mmdet>=3.0.0', 'mmpretrain>=1.0.0'],
    # Built on the machine that runs it, hence -march=native; OpenMP is the
    # one torch already loaded (its libgomp.so.1).
    ext_modules=[
        CppExtension(
            'mmdynconv.ops._cpu',
            sorted(glob.glob('mmdynconv/ops/csrc/*.cpp')),
            extra_compile_args=['-O3', '-march=native', '-fopenmp'],
            extra_link_args=['-fopenmp'])
    ],
    cmdclass={'build_ext': BuildExtension},
    license='Apache-2.0',
)
