"""Registry: models, trainers and datasets are looked up in `recbole_reason` first, then in RecBole.

- model `X`   -> class `X` in `recbole_reason.model.sequential_recommender.<x>`, else RecBole's `get_model`.
- trainer     -> class `XTrainer` in `recbole_reason.trainer.<x>_trainer`, else RecBole's `get_trainer`;
                 every trainer returned loads checkpoints with the torch >= 2.6 fix (`compat.TrustedCheckpointMixin`).
- dataset     -> class `XDataset` in `recbole_reason.data.<x>_dataset`, else RecBole's `create_dataset`.
"""

import importlib
import importlib.util
import os
import pkgutil

from recbole.model.abstract_recommender import AbstractRecommender
from recbole.utils import ModelType
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_reason.compat import TrustedCheckpointMixin

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
    if issubclass(trainer_class, TrustedCheckpointMixin):
        return trainer_class
    if trainer_class not in _trusted_trainers:
        _trusted_trainers[trainer_class] = type(trainer_class.__name__, (TrustedCheckpointMixin, trainer_class), {})
    return _trusted_trainers[trainer_class]


def check_dataset_files(config):
    """Fail fast, before RecBole tries to download anything, when the dataset is not on disk."""
    folder = config["data_path"]
    dataset = config["dataset"]
    inter_file = os.path.join(folder, f"{dataset}.inter")
    if config["benchmark_filename"]:
        inter_file = os.path.join(folder, f"{dataset}.{config['benchmark_filename'][0]}.inter")
    if not os.path.isfile(inter_file):
        raise FileNotFoundError(
            f"Dataset '{dataset}' not found: {inter_file} does not exist. Put the RecBole atomic files in "
            f"<data_path>/{dataset}/ and pass --data_path=<data_path> (e.g. --data_path=../shared/data). "
            "recbole-reason never downloads datasets."
        )
    _check_inter_columns(config, inter_file)


def _check_inter_columns(config, inter_file):
    """An empty .inter file, or one without a column the config loads, fails here with the file's name rather
    than as a KeyError deep inside RecBole's data processing."""
    with open(inter_file, encoding="utf-8") as f:
        header = f.readline().rstrip("\n")
        has_rows = bool(f.readline().strip())
    if not header or not has_rows:
        raise ValueError(f"{inter_file} is empty: a RecBole .inter file needs a typed header and at least one row.")
    columns = [column.split(":")[0] for column in header.split(config["field_separator"])]
    load_col = config["load_col"] or {}
    required = set(load_col.get("inter", [])) | {config["USER_ID_FIELD"], config["ITEM_ID_FIELD"]}
    if config["MODEL_TYPE"] == ModelType.SEQUENTIAL and config["eval_args"]["order"] == "TO":
        required.add(config["TIME_FIELD"])
    missing = sorted(column for column in required if column and column not in columns)
    if missing:
        raise ValueError(
            f"{inter_file} has no column {', '.join(missing)} (its columns: {', '.join(columns)}). Fix the file, or "
            "the config: load_col.inter, USER_ID_FIELD / ITEM_ID_FIELD / TIME_FIELD (sequential models order by time)."
        )


def create_dataset(config):
    check_dataset_files(config)
    module = _import_if_exists(f"recbole_reason.data.{config['model'].lower()}_dataset")
    dataset_class = getattr(module, f"{config['model']}Dataset", None) if module else None
    if dataset_class is not None:
        return dataset_class(config)
    from recbole.data import create_dataset as recbole_create_dataset

    return recbole_create_dataset(config)
