"""What fmpsr adds to BasicSR's ``train_pipeline`` / ``test_pipeline`` (installed by ``import fmpsr``).

* Options are checked right after parsing, before any experiment folder is made or renamed: every
  key and value a model reads (:mod:`fmpsr.option_keys`: unknown keys with the closest known one), the
  model class's ``check_options(opt)`` (unknown pruning keys, bad targets, scale mismatch, ...), the
  files named under ``path`` and every data set (:mod:`fmpsr.data.checks`).
* The training set is wrapped in :class:`~fmpsr.data.sampling.SeededDataset` and sampled by
  :class:`~fmpsr.data.sampling.ResumableSampler`: augmentations depend only on (manual_seed, epoch,
  index), and a resumed run skips the samples its killed predecessor consumed in that epoch, so it
  sees exactly the batches an uninterrupted run would. ``torchrun`` ranks together see the batches
  of a single process with the same global batch.
* One run per name at a time: right after parsing, before anything is checked, made, renamed or
  removed, the run takes the lock ``experiments/.<name>.lock`` (``results/.<name>.lock`` for
  ``test.py``) for its lifetime (:mod:`fmpsr.run_lock`); under ``torchrun`` / SLURM rank 0 takes it
  and tells the other ranks.
* The resume state is chosen, loaded and checked before any folder is made
  (:func:`fmpsr.compat.load_resume_state`: CPU-safe, ``weights_only``; ``--auto_resume`` falls back
  to the newest state whose network checkpoint loads too, and the log names what it skipped).
* Training stops cleanly on SIGTERM with a checkpoint; ``deterministic: true`` (or
  ``--deterministic``) sets torch's deterministic flags after BasicSR turned ``cudnn.benchmark`` on
  (:mod:`fmpsr.run_control`).
"""
import logging

import torch

import basicsr.test
import basicsr.train
from basicsr.utils import logger as basicsr_logger
from basicsr.utils.registry import MODEL_REGISTRY

from . import run_control
from .compat import load_resume_state
from .data.checks import check_datasets, check_paths
from .data.sampling import ResumableSampler, SeededDataset
from .option_keys import check_option_keys, closest
from .run_lock import acquire

_STATE = {'seed': None, 'resume': None, 'sampler': None, 'loaded': None, 'skipped': [], 'opt': None, 'model': None,
          'scores': {}}
_ORIGINAL = {}


def check_options(opt):
    """Run the model class's ``check_options`` (if it has one), the path checks and the data set checks.

    Raises:
        ValueError (and subclasses): naming the key, folder or file at fault.
        KeyError: an unknown or missing ``model_type`` (the known ones are listed).
        FileNotFoundError: a file named under ``path`` that does not exist (key and path named).
    """
    model_type = opt.get('model_type')
    if model_type not in MODEL_REGISTRY:
        known = sorted(name for name, _ in MODEL_REGISTRY)
        raise KeyError(f'model_type: unknown model {model_type!r}{closest(model_type, known)} (known: {known})')
    model_cls = MODEL_REGISTRY.get(model_type)
    check_option_keys(opt, model_cls)  # unknown keys, types and values anywhere, named with the closest known
    if hasattr(model_cls, 'check_options'):
        # checks may build networks (e.g. fmpsr.pruning.coupling.check_prunable): their weight init must
        # not draw from the global RNG that BasicSR has just seeded for the run itself
        with torch.random.fork_rng(devices=[]):
            model_cls.check_options(opt)
    run_control.check_deterministic(opt)
    check_paths(opt)
    check_datasets(opt)


def lock_run(opt):
    """Take the lock of the run's folder (``experiments/<name>`` or ``results/<name>``) for this
    process's lifetime; with several ranks rank 0 takes it and every rank raises if it failed.

    Raises:
        fmpsr.run_lock.RunLockedError (an OSError): another live run holds it.
    """
    folder = opt['path'].get('experiments_root') if opt.get('is_train') else opt['path'].get('results_root')
    if not folder:
        return
    import torch.distributed as dist
    error = None
    if opt.get('rank', 0) == 0:
        try:
            acquire(folder, 'experiment' if opt.get('is_train') else 'test run')
        except OSError as e:
            error = e
    if opt.get('dist') and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        shared = [None if error is None else (type(error).__name__, str(error))]
        dist.broadcast_object_list(shared, src=0)
        if shared[0] is not None and error is None:
            from .run_lock import RunLockedError
            error = RunLockedError(shared[0][1]) if shared[0][0] == 'RunLockedError' else OSError(shared[0][1])
    if error is not None:
        raise error


def _parse_options(parse):
    def parse_and_check(root_path, is_train=True):
        opt, args = parse(root_path, is_train=is_train)  # --deterministic: fmpsr.options_io
        _STATE.update(opt=opt, model=None, scores={})
        configured = 'basicsr' in basicsr_logger.initialized_logger
        lock_run(opt)
        check_options(opt)
        if is_train:
            _STATE['skipped'] = []
            _STATE['loaded'] = (id(opt), load_resume_state(opt, _STATE['skipped']))
        if not configured:
            _forget_logger('basicsr')
        return opt, args
    return parse_and_check


def _forget_logger(name):
    """Undo a configuration of BasicSR's logger ``name`` made by a check (e.g. ``build_network`` logs).

    ``get_root_logger`` sets the level and the log file on its first call only; a first call from a
    check, before the pipeline's own call with ``log_file``, would leave INFO messages off and no
    ``train_*.log``.
    """
    if basicsr_logger.initialized_logger.pop(name, None) is not None:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()


def _load_resume_state(opt):
    loaded, _STATE['loaded'] = _STATE['loaded'], None
    state = loaded[1] if loaded is not None and loaded[0] == id(opt) else load_resume_state(opt, _STATE['skipped'])
    _STATE['resume'] = None if state is None else (int(state['iter']), int(state['epoch']))
    return state


def _build_dataset(dataset_opt):
    dataset = _ORIGINAL['build_dataset'](dataset_opt)
    if dataset_opt.get('phase') == 'train':
        dataset = SeededDataset(dataset, _STATE['seed'])
    return dataset


def _create_train_val_dataloader(opt, logger):
    _STATE['seed'] = opt.get('manual_seed') or 0
    for line in _STATE['skipped']:
        logger.warning(f'--auto_resume skipped {line}')
    result = _ORIGINAL['create_train_val_dataloader'](opt, logger)
    train_loader, train_sampler = result[0], result[1]
    _STATE['sampler'] = train_sampler
    if _STATE['resume'] is not None and train_loader is not None:
        resume_iter, resume_epoch = _STATE['resume']
        consumed = resume_iter - resume_epoch * len(train_loader)
        if 0 < consumed <= len(train_loader):
            train_sampler.resume_from(resume_epoch, consumed * train_loader.batch_size)
            logger.info(f'Resume: skipping the {consumed} batches of epoch {resume_epoch} '
                        f'that iterations up to {resume_iter} consumed')
        elif consumed != 0:
            logger.warning(f'Resume: iteration {resume_iter} is not inside epoch {resume_epoch} of '
                           f'{len(train_loader)} batches (did batch_size_per_gpu, dataset_enlarge_ratio or the '
                           'data change?); the epoch restarts from its first batch, so the data order differs '
                           'from an uninterrupted run')
    return result


def _build_dataloader(*args, **kwargs):
    return run_control.workers_ignore_sigterm(_ORIGINAL['build_dataloader'](*args, **kwargs))


def _build_model(build):
    def build_and_watch(opt):
        run_control.apply_deterministic(opt)  # after BasicSR's cudnn.benchmark = True
        model = build(opt)
        _record_scores(model)
        if opt.get('is_train'):
            run_control.stop_between_iterations(model, opt, current_epoch, basicsr_logger.get_root_logger().info)
        return model
    return build_and_watch


def _record_scores(model):
    """Keep the metrics of each validation / test call per data set (the last one wins), for
    :func:`finished_run`."""
    _STATE['model'] = model
    validation = getattr(model, 'validation', None)
    if validation is None:  # not a BasicSR model (nothing to record)
        return

    def validation_and_record(dataloader, current_iter, tb_logger, save_img=False):
        result = validation(dataloader, current_iter, tb_logger, save_img)
        values = getattr(model, 'metric_results', None)
        if values and opt_rank(model.opt) == 0:
            _STATE['scores'][dataloader.dataset.opt['name']] = {k: float(v) for k, v in values.items()}
        return result
    model.validation = validation_and_record


def opt_rank(opt):
    """The process's rank in a distributed run (0 without one)."""
    return int(opt.get('rank', 0) or 0)


def finished_run():
    """``(opt, model, scores)`` of the run this process just finished (``scores``: ``{data set:
    {metric: value}}`` of the last validation / test of each set); (None, None, {}) before one."""
    return _STATE['opt'], _STATE['model'], dict(_STATE['scores'])


def current_epoch():
    """The epoch BasicSR's training loop is in (from the training sampler), or None outside it."""
    sampler = _STATE['sampler']
    return None if sampler is None else sampler.epoch


def install():
    """Install the hooks above into ``basicsr.train`` / ``basicsr.test`` (idempotent)."""
    if _ORIGINAL:
        return
    _ORIGINAL.update(build_dataset=basicsr.train.build_dataset, build_dataloader=basicsr.train.build_dataloader,
                     create_train_val_dataloader=basicsr.train.create_train_val_dataloader)
    basicsr.train.parse_options = _parse_options(basicsr.train.parse_options)
    basicsr.test.parse_options = _parse_options(basicsr.test.parse_options)
    basicsr.train.load_resume_state = _load_resume_state
    basicsr.train.build_dataset = _build_dataset
    basicsr.train.EnlargedSampler = ResumableSampler
    basicsr.train.create_train_val_dataloader = _create_train_val_dataloader
    basicsr.train.build_dataloader = _build_dataloader
    basicsr.train.build_model = _build_model(basicsr.train.build_model)
    basicsr.test.build_model = _build_model(basicsr.test.build_model)


def close_process_group():
    """After training, wait for every rank and destroy the process group (no-op without one).

    BasicSR validates and saves the last model on rank 0 only and never destroys the group, so the
    other ranks used to exit first, while gloo's threads were still alive, and could abort with
    "terminate called without an active exception" (exit code -6) under load.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
