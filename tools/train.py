"""Train a detector (MMDetection) or a classifier (MMPretrain) from a config.

The config's ``default_scope`` decides which library builds the model, the
data and the metrics; ``import mmdynconv`` registers the AIK modules. The
interface is MMDetection's ``tools/train.py``::

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CHECKPOINT]]
        [--amp] [--auto-scale-lr] [--cfg-options KEY=VALUE ...]
        [--launcher {none,pytorch,slurm,mpi}]

Before the runner writes anything to the work dir, the inputs are checked:
the data files the config reads must exist and its model must build. A
failure ends the run with one ``error:`` line that names the culprit.

Without CUDA, ``--launcher pytorch`` (``tools/dist_train.sh``) runs
mmengine's DDP on CPU over the gloo backend: mmengine's own ``init_dist``
would pin a CUDA device, so the process group is started here.

The helpers are shared with ``tools/test.py``.
"""
import argparse
import inspect
import os
import os.path as osp
from datetime import timedelta

import torch
from mmengine.config import Config, DictAction
from mmengine.registry import DATASETS, MODELS, RUNNERS, DefaultScope
from mmengine.runner import Runner

import mmdynconv  # noqa: F401  (registers the AIK layer and backbones)

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments that ``train.py`` and ``test.py`` share."""
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, e.g. train_cfg.max_epochs=2 or '
        'key="[a,b]" for lists (no white space)')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none')
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK.
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0)


def fail(message: str) -> None:
    """End the run with one line on stderr (exit status 1)."""
    raise SystemExit(f'error: {message}')


def load_config(args: argparse.Namespace) -> Config:
    """The config with ``--cfg-options``, launcher and work dir applied
    (work dir: ``--work-dir``, else the config's, else
    ``work_dirs/<config name>``)."""
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    if not osp.isfile(args.config):
        fail(f'config file not found: {args.config}')
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif not cfg.get('work_dir'):
        name = osp.splitext(osp.basename(args.config))[0]
        cfg.work_dir = osp.join('work_dirs', name)
    return cfg


def _is_remote(path: str) -> bool:
    return '://' in path


def _downloads_itself(dataset: dict) -> bool:
    """Whether the dataset fetches missing files (MMPretrain's CIFAR, ...)."""
    dataset_cls = dataset.get('type')
    if isinstance(dataset_cls, str):
        with DATASETS.switch_scope_and_registry(None) as registry:
            dataset_cls = registry.get(dataset_cls)
    if dataset_cls is None:
        return False
    param = inspect.signature(dataset_cls).parameters.get('download')
    return bool(dataset.get('download', param.default if param else False))


def _check_dataset(dataset: dict, where: str) -> None:
    """Fail if a local data root, annotation file or data prefix is missing;
    dataset wrappers are checked through their inner datasets."""
    if 'dataset' in dataset:
        _check_dataset(dataset['dataset'], f'{where}.dataset')
    for i, inner in enumerate(dataset.get('datasets', [])):
        _check_dataset(inner, f'{where}.datasets[{i}]')
    if _downloads_itself(dataset):
        return
    root = dataset.get('data_root') or ''
    if root and not _is_remote(root) and not osp.isdir(root):
        fail(f'{where}.data_root: no such directory: {root}')
    ann_file = dataset.get('ann_file') or ''
    ann_path = osp.join(root, ann_file)
    if ann_file and not _is_remote(ann_path) and not osp.isfile(ann_path):
        fail(f'{where}.ann_file: no such file: {ann_path}')
    prefix = dataset.get('data_prefix') or {}
    prefixes = prefix.items() if isinstance(prefix, dict) else [('', prefix)]
    for key, value in prefixes:
        path = osp.join(root, value)
        if value and not _is_remote(path) and not osp.exists(path):
            field = f'data_prefix.{key}' if key else 'data_prefix'
            fail(f'{where}.{field}: no such path: {path}')


def _check_metrics(metrics, where: str) -> None:
    """Fail if a metric's local ``ann_file`` (e.g. CocoMetric's) is missing."""
    for metric in metrics if isinstance(metrics, list) else [metrics]:
        ann_file = metric.get('ann_file') or ''
        if ann_file and not _is_remote(ann_file) and not osp.isfile(ann_file):
            fail(f'{where}.ann_file: no such file: {ann_file}')


def check_inputs(cfg: Config, phases) -> None:
    """Fail with a message naming the culprit, before anything is written,
    if the model does not build or a data file of a phase ('train', 'val',
    'test') is missing: the datasets and the metrics' ``ann_file``."""
    with DefaultScope.overwrite_default_scope(cfg.get('default_scope')):
        try:
            MODELS.build(cfg.model)
        except Exception as error:  # noqa: BLE001  (reported, then exit)
            what = f'model {cfg.model.get("type")}'
            if 'backbone' in cfg.model:
                what += f', backbone {cfg.model.backbone.get("type")}'
            fail(f'cannot build the {what}: {error}')
        for phase in phases:
            loader = cfg.get(f'{phase}_dataloader')
            if loader:
                _check_dataset(loader.dataset, f'{phase}_dataloader.dataset')
            if cfg.get(f'{phase}_evaluator'):
                _check_metrics(cfg[f'{phase}_evaluator'], f'{phase}_evaluator')


def setup_cpu_distributed(cfg: Config) -> None:
    """Without CUDA, start the gloo process group for ``--launcher pytorch``
    and wrap the model in DDP without device ids; the runner then uses both
    (mmengine's ``init_dist`` would call ``torch.cuda.set_device``)."""
    if cfg.launcher == 'none' or torch.cuda.is_available():
        return
    if cfg.launcher != 'pytorch':
        fail(f'--launcher {cfg.launcher} needs CUDA; on CPU use '
             '--launcher pytorch (tools/dist_train.sh, tools/dist_test.sh)')
    dist_cfg = cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})
    dist_cfg['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or dict(
        type='MMDistributedDataParallel',
        broadcast_buffers=False,
        find_unused_parameters=cfg.get('find_unused_parameters', False))
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper
    torch.distributed.init_process_group(
        backend='gloo',
        timeout=timedelta(seconds=dist_cfg.get('timeout', 1800)))


def build_runner(cfg: Config) -> Runner:
    """mmengine's ``Runner``, or the config's ``runner_type`` from RUNNERS."""
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Train a detector or classifier (mmdynconv)')
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='where logs and checkpoints go')
    parser.add_argument(
        '--resume',
        nargs='?',
        const='auto',
        help='resume from CHECKPOINT, or without one from the latest '
        'checkpoint in the work dir')
    parser.add_argument(
        '--amp', action='store_true', help='automatic mixed precision')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the lr by the real over the config\'s base batch size')
    add_common_args(parser)
    return parser.parse_args()


def main():
    args = parse_args()
    cfg = load_config(args)
    if args.amp:
        if not torch.cuda.is_available():
            fail('--amp needs a CUDA device')
        cfg.optim_wrapper.type = 'AmpOptimWrapper'
        cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
    if args.auto_scale_lr:
        if 'base_batch_size' not in cfg.get('auto_scale_lr', {}):
            fail('--auto-scale-lr needs auto_scale_lr.base_batch_size in '
                 'the config')
        cfg.auto_scale_lr.enable = True
    if args.resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        if not _is_remote(args.resume) and not osp.isfile(args.resume):
            fail(f'--resume: no such checkpoint: {args.resume}')
        cfg.resume, cfg.load_from = True, args.resume
    validates = cfg.get('val_cfg') is not None
    check_inputs(cfg, ['train', 'val'] if validates else ['train'])
    setup_cpu_distributed(cfg)
    build_runner(cfg).train()


if __name__ == '__main__':
    main()
