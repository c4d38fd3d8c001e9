"""recbole-reason: reasoning-enhanced sequential recommenders (ReaRec, LARES, R2ec, REG4Rec) for RecBole 1.2.1.

Importing the package applies the compatibility fixes of `recbole_reason.compat` before any RecBole object
is built. The package never imports `recbole.quick_start` (it pulls in ray).
"""

from recbole_reason import compat

compat.apply()

from recbole_reason.config import Config  # noqa: E402
from recbole_reason.inference import load_data_and_model, recommend  # noqa: E402
from recbole_reason.quick_start import objective_function, run_recbole_reason  # noqa: E402
from recbole_reason.utils import create_dataset, get_model, get_trainer, plugin_model_names  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "Config",
    "run_recbole_reason",
    "objective_function",
    "get_model",
    "get_trainer",
    "create_dataset",
    "plugin_model_names",
    "load_data_and_model",
    "recommend",
]
