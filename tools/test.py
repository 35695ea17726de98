"""Test (and evaluate) a checkpoint of a detector or classifier config.

The interface is MMDetection's ``tools/test.py``; the config's
``default_scope`` decides the library, as in ``tools/train.py``, whose input
checks and CPU-distributed set-up this script shares::

    python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--out FILE.pkl]
        [--show-dir DIR] [--cfg-options KEY=VALUE ...]
        [--launcher {none,pytorch,slurm,mpi}]

The metrics are logged and saved as JSON in ``WORK_DIR/<timestamp>/``.
"""
import argparse
import os.path as osp

from mmengine.config import Config
from mmengine.evaluator import DumpResults

import mmdynconv  # noqa: F401  (registers the AIK layer and backbones)
from train import (add_common_args, build_runner, check_inputs, fail,
                   load_config, setup_cpu_distributed)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Test a detector or classifier checkpoint (mmdynconv)')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='where logs and metrics go')
    parser.add_argument(
        '--out', help='also dump the predictions to this .pkl file')
    parser.add_argument(
        '--show-dir',
        help='draw the predictions into this folder (under the work dir)')
    add_common_args(parser)
    return parser.parse_args()


def enable_visualization(cfg: Config, show_dir: str) -> None:
    """Make the config's visualization hook draw into ``show_dir``
    (MMDetection's ``DetVisualizationHook`` or MMPretrain's)."""
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        fail('--show-dir needs default_hooks.visualization in the config')
    if cfg.get('default_scope') == 'mmdet':
        hook.update(draw=True, test_out_dir=show_dir)
    else:
        hook.update(enable=True, out_dir=show_dir)


def dump_metric(cfg: Config, out: str) -> DumpResults:
    """A metric that pickles the predictions (MMDetection's variant
    compresses masks)."""
    if not out.endswith(('.pkl', '.pickle')):
        fail(f'--out must name a .pkl or .pickle file, got {out}')
    if cfg.get('default_scope') == 'mmdet':
        from mmdet.evaluation import DumpDetResults
        return DumpDetResults(out_file_path=out)
    return DumpResults(out_file_path=out)


def main():
    args = parse_args()
    cfg = load_config(args)
    if '://' not in args.checkpoint and not osp.isfile(args.checkpoint):
        fail(f'no such checkpoint: {args.checkpoint}')
    cfg.load_from = args.checkpoint
    if args.show_dir:
        enable_visualization(cfg, args.show_dir)
    dump = dump_metric(cfg, args.out) if args.out else None
    check_inputs(cfg, ['test'])
    setup_cpu_distributed(cfg)
    runner = build_runner(cfg)
    if dump is not None:
        runner.test_evaluator.metrics.append(dump)
    runner.test()


if __name__ == '__main__':
    main()
