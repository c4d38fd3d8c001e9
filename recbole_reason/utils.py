"""Registry: models, trainers and datasets are looked up in `recbole_reason` first, then in RecBole.

- model `X`   -> class `X` in `recbole_reason.model.sequential_recommender.<x>`, else RecBole's `get_model`.
- trainer     -> class `XTrainer` in `recbole_reason.trainer.<x>_trainer`, else RecBole's `get_trainer`;
                 every trainer returned loads checkpoints with the torch >= 2.6 fix (`checkpoint.CheckpointMixin`)
                 and trains under DDP on the CPU as on GPUs (`distributed.DistributedTrainerMixin`).
- dataset     -> class `XDataset` in `recbole_reason.data.<x>_dataset`, else RecBole's `create_dataset`; the
                 atomic files are checked first (`data.validation`), the configuration was checked when the Config
                 was built (`data.config_checks`).
"""

import importlib
import importlib.util
import pkgutil

from recbole.model.abstract_recommender import AbstractRecommender
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_reason.checkpoint import CheckpointMixin
from recbole_reason.data.validation import check_dataset_files, check_sequence_lengths
from recbole_reason.distributed import DistributedTrainerMixin

MODEL_PACKAGE = "recbole_reason.model.sequential_recommender"


def _import_if_exists(module_path):
    try:
        found = importlib.util.find_spec(module_path)
    except ModuleNotFoundError:
        found = None
    return importlib.import_module(module_path) if found else None


def plugin_model_names():
    """Class names of the models this plugin registers, sorted."""
    package = importlib.import_module(MODEL_PACKAGE)
    names = []
    for module_info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{MODEL_PACKAGE}.{module_info.name}")
        names += [
            name
            for name, obj in vars(module).items()
            if isinstance(obj, type)
            and issubclass(obj, AbstractRecommender)
            and obj.__module__ == module.__name__
            and name.lower() == module_info.name
        ]
    return sorted(names)


def get_model(model_name):
    module = _import_if_exists(f"{MODEL_PACKAGE}.{model_name.lower()}")
    if module is not None and hasattr(module, model_name):
        return getattr(module, model_name)
    try:
        return recbole_get_model(model_name)
    except (ValueError, AttributeError, ImportError) as error:
        # RecBole's lookup ends in its exlib package, which fails to import without lightgbm/xgboost.
        detail = f" (RecBole's lookup: {error})" if isinstance(error, ImportError) else ""
        raise ValueError(
            f"Unknown model '{model_name}'. recbole-reason models: {', '.join(plugin_model_names())}; "
            f"or any RecBole model (e.g. SASRec, GRU4Rec, BERT4Rec). Names are case-sensitive.{detail}"
        ) from None


_trusted_trainers = {}


def get_trainer(model_type, model_name):
    module = _import_if_exists(f"recbole_reason.trainer.{model_name.lower()}_trainer")
    trainer_class = getattr(module, f"{model_name}Trainer", None) if module else None
    if trainer_class is None:
        trainer_class = recbole_get_trainer(model_type, model_name)
    if trainer_class not in _trusted_trainers:
        # DistributedTrainerMixin: DDP on the CPU as on GPUs (a no-op in one process).
        trusted = () if issubclass(trainer_class, CheckpointMixin) else (CheckpointMixin,)
        bases = (DistributedTrainerMixin, *trusted, trainer_class)
        _trusted_trainers[trainer_class] = type(trainer_class.__name__, bases, {})
    return _trusted_trainers[trainer_class]


def create_dataset(config):
    """The dataset class (plugin `XDataset` or RecBole's), after the file checks and before anything is written."""
    check_dataset_files(config)
    module = _import_if_exists(f"recbole_reason.data.{config['model'].lower()}_dataset")
    dataset_class = getattr(module, f"{config['model']}Dataset", None) if module else None
    if dataset_class is not None:
        dataset = dataset_class(config)
        check_sequence_lengths(config, dataset)
        return dataset
    from recbole.data import create_dataset as recbole_create_dataset

    save_dataset = config["save_dataset"]
    config["save_dataset"] = False  # RecBole would pickle the dataset before check_sequence_lengths could refuse it
    try:
        dataset = recbole_create_dataset(config)
    finally:
        config["save_dataset"] = save_dataset
    check_sequence_lengths(config, dataset)
    if save_dataset:
        dataset.save()
    return dataset


def metrics_table(rows):
    """Markdown table of metric dicts, e.g. {'best valid': {...}, 'test': {...}}: pasteable into a paper."""
    rows = {name: result for name, result in rows.items() if result}
    if not rows:
        return ""
    metrics = list(next(iter(rows.values())).keys())
    lines = ["| split | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, result in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{float(result[m]):.4f}" for m in metrics) + " |")
    return "\n".join(lines)
