"""`Config` for plugin models and RecBole's own, with the plugin's YAML layered on top of RecBole's.

Internal YAML, lowest priority first (config files, config_dict and the command line still override all):
RecBole's overall/model/dataset/quick-start files; then, for every SEQUENTIAL model (baselines included),
our `properties/overall.yaml`; then `properties/dataset/<dataset>.yaml`; then `properties/model/<Model>.yaml`.
Building a Config checks it (`data.config_checks`): malformed YAML, wrong types and ranges, unknown keys, a gpu_id
the machine lacks, each in one line, before any dataset is read.
"""

import os
from importlib import resources

from recbole.config import Config as RecBoleConfig
from recbole.utils import ModelType

from recbole_reason.data.config_checks import check_config, check_device, load_config_files
from recbole_reason.distributed import init_distributed_device
from recbole_reason.utils import get_model


def properties_dir():
    """The plugin's YAML folder: the top-level `properties/` of the source checkout this package was imported
    from (a clone, installed or not, as with RecBole-GNN: its own YAML wins over any other installed copy), else
    the package data `recbole_reason.properties` of an installed wheel."""
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "properties")
    if os.path.isfile(os.path.join(checkout, "overall.yaml")):
        return checkout
    return str(resources.files("recbole_reason.properties"))


class Config(RecBoleConfig):
    def _load_config_files(self, file_list):
        settings, self.setting_files = load_config_files(file_list, self.yaml_loader)
        return settings

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise KeyError("No model given: pass --model=<Name> (e.g. --model=ReaRec) or set `model` in a config file.")
        if isinstance(model, str):
            model_class = get_model(model)
        else:
            model_class, model = model, model.__name__
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise KeyError("No dataset given: pass --dataset=<name> (e.g. --dataset=ml-100k) or set `dataset` in a config file.")
        return model, model_class, dataset

    def _init_device(self):
        # One process: RecBole's own. One of a multi-process run (the launcher sets `local_rank`): RecBole's
        # hard-codes NCCL and CUDA; ours joins the group on the backend the device calls for (Gloo on the CPU).
        if "local_rank" not in self.final_config_dict:
            super()._init_device()
            return check_device(self.final_config_dict, explicit="gpu_id" in self.external_config_dict)
        init_distributed_device(self.final_config_dict)

    def _set_default_parameters(self):
        check_config(self, properties_dir())  # before RecBole's own processing, which fails on some with a traceback
        super()._set_default_parameters()

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        folder = properties_dir()
        layers = [os.path.join(folder, "dataset", f"{dataset}.yaml"), os.path.join(folder, "model", f"{model}.yaml")]
        if model_class.type == ModelType.SEQUENTIAL:
            layers.insert(0, os.path.join(folder, "overall.yaml"))
        for file in layers:
            if os.path.isfile(file):
                loaded = self._update_internal_config_dict(file)
                if "/dataset/" in file.replace(os.sep, "/") and loaded:
                    self.parameters["Dataset"] += [key for key in loaded if key not in self.parameters["Dataset"]]
