"""Configuration checks: every mistake in the settings ends in one line before any dataset is read.

RecBole takes its settings as they come: a learning rate given as text reaches the optimizer, a sequence length of 0
reaches the model, a metric name it does not know in `valid_metric` fails after the first training epoch, a negative
epoch count trains nothing and tests the untrained model, a misspelt key is ignored, a `gpu_id` naming a GPU the
machine lacks trains on the CPU. Our `Config` runs these checks while it is built (`Config._load_config_files`,
`_set_default_parameters`, `_init_device`), so every entry point (run script, `run_recbole_reason`, the tuning
objective, the comparison, the benchmarks) meets them before `create_dataset`:

- `load_config_files`: a config file that is not valid YAML -> file, line, column; one that is not a mapping.
- `check_config`: types and ranges of the RecBole keys users set (RULES, plus metrics / topk / valid_metric /
  eval_args / gpu_id), and a numeric or boolean key given as text (its default's type). All failures together,
  one line each: the key, the value and where it was set, what is allowed, the fix.
- unknown keys: a warning per key no model and no part of RecBole reads (`known_keys`: RecBole's YAML files and the
  keys its code reads, for every model type; the plugin's `properties/`; the keys the plugin's code reads), with
  the closest known key ("did you mean ...").
- `check_device`: a `gpu_id` naming a GPU the machine does not have. An error when the machine has GPUs but not the
  named one (the run would silently train on the CPU); a warning when it has none (a config written for a GPU
  machine still runs on a laptop, as documented, but says so). RecBole's default `gpu_id` ('0') falls back quietly.
"""

import difflib
import functools
import glob
import math
import numbers
import os
import re
from logging import getLogger

import yaml
from recbole.evaluator.register import metric_types, metrics_dict
from recbole.utils import ModelType
from recbole.utils import argument_list


class ConfigError(ValueError):
    """A configuration mistake; the message holds one line per problem."""


# -- config files -------------------------------------------------------------------------------------------------
YAML_FIX = ("one 'key: value' per line, a space after each colon, spaces (not tabs) to indent, brackets closed, "
            "and quotes around a value that holds ': ' or ' #'")


def load_config_files(file_list, loader):
    """RecBole's `_load_config_files` with errors that name the file: -> (settings, {key: the file that set it})."""
    settings, sources = {}, {}
    for file in file_list or []:
        if not os.path.isfile(file):
            raise ConfigError(f"Config file {file} does not exist. Fix: pass existing YAML files (config_file_list, "
                              "or --config_files with the paths separated by spaces).")
        with open(file, encoding="utf-8") as f:
            text = f.read()
        try:
            loaded = yaml.load(text, Loader=loader)
        except yaml.MarkedYAMLError as error:
            mark, context = error.problem_mark or error.context_mark, error.context_mark
            problem = " ".join(str(error.problem or error.context or "syntax error").split())
            if context is not None and "simple key" in str(error.context):  # a key without its colon: YAML
                mark, problem = context, "a key without ':'"  # notices on a later line; point at the key itself
            elif problem == "mapping values are not allowed here":
                problem += ": a ': ' inside a value, or a key without ':' on the line above"
            elif context is not None and context.line != mark.line:
                problem += f", in the entry that starts at line {context.line + 1}"
            raise ConfigError(f"{file}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML ({problem}). "
                              f"Fix: {YAML_FIX}.") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"{file}: not valid YAML ({' '.join(str(error).split())}). Fix: {YAML_FIX}.") from None
        if loaded is None:
            continue  # empty, or comments only: sets nothing (RecBole itself fails on it)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file}: a config file is a mapping of 'key: value' lines, this one is a "
                              f"{type(loaded).__name__} ({text.strip().splitlines()[0][:60]!r}). Fix: {YAML_FIX}.")
        bad_keys = [key for key in loaded if not isinstance(key, str)]
        if bad_keys:
            raise ConfigError(f"{file}: key {bad_keys[0]!r} is not a name. Fix: keys are setting names such as "
                              "learning_rate.")
        settings.update(loaded)
        sources.update(dict.fromkeys(loaded, file))
    return settings, sources


# -- value rules ----------------------------------------------------------------------------------------------------
def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(minimum):
    return lambda value: _is_int(value) and value >= minimum


def _is_intervals(value):
    """RecBole's `_parse_intervals_str` reads str(value) ("[4,inf)", "(0,1];[3,4)"; a config_dict's "[20,25]"
    arrives as the list [20, 25]) and skips a malformed interval with a log line: the filter is then silently off."""
    if value is None:
        return True
    if not isinstance(value, (str, list, tuple)):
        return False
    for part in str(value).split(";"):
        part = part.strip()
        ends = part[1:-1].split(",")
        if len(part) < 2 or part[0] not in "[(" or part[-1] not in "])" or len(ends) != 2:
            return False
        try:
            float(ends[0]), float(ends[1])
        except ValueError:
            return False
    return True


LOG_LEVELS = ("INFO", "DEBUG", "WARNING", "ERROR", "CRITICAL")
LEARNERS = ("adam", "adamw", "sgd", "adagrad", "rmsprop", "sparse_adam")

# key -> (test, what is allowed, an example value). Checked wherever the key is set, defaults included.
RULES = {
    "learning_rate": (lambda v: _is_number(v) and v > 0, "a number > 0", 0.001),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0", 0.0),
    "epochs": (_int_at_least(0), "an integer >= 0 (epochs of the supervised stage)", 200),
    "train_batch_size": (_int_at_least(1), "an integer >= 1", 2048),
    "eval_batch_size": (_int_at_least(1), "an integer >= 1", 4096),
    "stopping_step": (_int_at_least(0), "an integer >= 0 (evaluations without improvement before stopping)", 10),
    "eval_step": (_int_at_least(0), "an integer >= 0 (epochs between validations; 0: no validation)", 1),
    "MAX_ITEM_LIST_LENGTH": (_int_at_least(1), "an integer >= 1 (items of history the model reads)", 50),
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)", 2020),
    "worker": (_int_at_least(0), "an integer >= 0 (data-loading worker processes)", 0),
    "hidden_dropout_prob": (lambda v: v is None or (_is_number(v) and 0 <= v <= 1), "a number in [0, 1]", 0.5),
    "attn_dropout_prob": (lambda v: v is None or (_is_number(v) and 0 <= v <= 1), "a number in [0, 1]", 0.5),
    "state": (lambda v: v is None or (isinstance(v, str) and v.upper() in LOG_LEVELS),
              f"a log level, one of {', '.join(LOG_LEVELS)}", "INFO"),
    "learner": (lambda v: isinstance(v, str) and v.lower() in LEARNERS, f"one of {', '.join(LEARNERS)}", "adam"),
    "data_path": (lambda v: isinstance(v, str) and v != "", "a folder path", "dataset/"),
    "checkpoint_dir": (lambda v: isinstance(v, str) and v != "", "a folder path", "saved"),
    "user_inter_num_interval": (lambda v: _is_intervals(v), "null or intervals like \"[4,inf)\" (';' between several)",
                                '"[4,inf)"'),
    "item_inter_num_interval": (lambda v: _is_intervals(v), "null or intervals like \"[5,inf)\" (';' between several)",
                                '"[5,inf)"'),
}
for _key in ("reproducibility", "show_progress", "repeatable", "save_dataset", "save_dataloaders", "log_wandb",
             "filter_inter_by_user_or_item", "enable_amp", "enable_scaler"):
    RULES[_key] = (lambda v: isinstance(v, bool), "true or false", True)
# Sizes of RecBole's sequential backbones, when the model's default is an integer.
SIZE_KEYS = ("hidden_size", "inner_size", "n_layers", "n_heads", "embedding_size")
SEQUENTIAL_LOSSES = ("CE", "BPR")
EVAL_ARGS_KEYS = ("split", "order", "group_by", "mode")
LEAVE_ONE_OUT_MODES = ("valid_and_test", "valid_only", "test_only")


def _looks_numeric(text):
    try:
        float(text)
        return True
    except ValueError:
        return text.strip().lower() in ("true", "false")


def _closest(word, choices):
    """The choice nearest `word` (case-insensitive), or None."""
    lowered = {choice.lower(): choice for choice in choices}
    found = difflib.get_close_matches(str(word).lower(), list(lowered), n=1, cutoff=0.75)
    return lowered[found[0]] if found else None


class _Problems:
    """Collects one line per failure: the key, the value, where it was set, what is allowed, the fix."""

    def __init__(self, config):
        self.config, self.lines = config, []

    def source(self, key):
        key = key.split(".")[0]  # eval_args.split -> eval_args
        if key in getattr(self.config, "cmd_config_dict", {}):
            return "--" + key + " on the command line"
        if key in getattr(self.config, "variable_config_dict", {}):
            return "config_dict"
        if key in getattr(self.config, "file_config_dict", {}):
            return getattr(self.config, "setting_files", {}).get(key, "a config file")
        return "a default YAML file"

    def add(self, key, value, allowed, fix):
        text = "text, " if isinstance(value, str) and _looks_numeric(value) else ""
        self.lines.append(f"{key} = {value!r} ({text}set in {self.source(key)}): must be {allowed}. Fix: {fix}")


def _fix_for(key, value, example, test=None):
    """Text that would be right without its quotes: say so; otherwise an example of a right value."""
    if isinstance(value, str) and _looks_numeric(value):
        unquoted = yaml.safe_load(value.strip())
        if test is None or test(unquoted if not isinstance(unquoted, str) else float(unquoted)):
            kind = "boolean" if isinstance(unquoted, bool) else "number"
            return f"write it without quotes, so YAML reads a {kind} (e.g. {key}: {value.strip()}, or " \
                   f"--{key}={value.strip()})."
    return f"set {key}: {example} in a config file (or --{key}={example})."


def _check_rules(settings, internal, model_type, problems):
    for key, (test, allowed, example) in RULES.items():
        if key in settings and not test(settings[key]):
            problems.add(key, settings[key], allowed, _fix_for(key, settings[key], example, test))
    for key in SIZE_KEYS:
        if key in settings and _is_int(internal.get(key)) and not _int_at_least(1)(settings[key]):
            problems.add(key, settings[key], "an integer >= 1",
                         _fix_for(key, settings[key], internal[key], _int_at_least(1)))
    if model_type == ModelType.SEQUENTIAL and settings.get("loss_type") not in (None, *SEQUENTIAL_LOSSES):
        problems.add("loss_type", settings["loss_type"], f"one of {', '.join(SEQUENTIAL_LOSSES)} for a sequential "
                     "model", "set loss_type: CE (full softmax over all items) or BPR (with train_neg_sample_args).")
    # Any other key whose default is a number or a boolean: the same type (a quoted YAML value is text).
    for key, value in settings.items():
        default = internal.get(key)
        if key in RULES or key in SIZE_KEYS or default is None or value is None:
            continue
        if isinstance(default, bool) and not isinstance(value, bool):
            if isinstance(value, str):
                problems.add(key, value, "true or false", _fix_for(key, value, default))
        elif _is_number(default) and (isinstance(value, (str, bool))):
            kind = "an integer" if _is_int(default) else "a number"
            problems.add(key, value, f"{kind}, like its default {default!r}", _fix_for(key, value, default))


def _metric_names(metrics):
    return [metrics] if isinstance(metrics, str) else metrics


def _check_evaluation(settings, problems):
    metrics, topk = settings.get("metrics"), settings.get("topk")
    known = {name: cls.__name__ for name, cls in metrics_dict.items()}
    names = _metric_names(metrics)
    metrics_ok = isinstance(names, list) and names and all(isinstance(m, str) for m in names)
    if not metrics_ok:
        problems.add("metrics", metrics, "a metric name or a non-empty list of them",
                     "set metrics: [Recall, NDCG, Hit, MRR].")
    else:
        for metric in names:
            if metric.lower() not in known:
                close = _closest(metric, known.values())
                problems.add("metrics", metrics, f"RecBole metrics, and '{metric}' is none "
                             f"({', '.join(sorted(known.values()))})",
                             (f"did you mean '{close}'? " if close else "") + "Names are case-insensitive.")
                metrics_ok = False
        kinds = {metric_types[m.lower()] for m in names if m.lower() in known}
        if metrics_ok and len(kinds) > 1:
            problems.add("metrics", metrics, "either ranking metrics (Recall, NDCG, ...) or value metrics (RMSE, AUC, "
                         "...), not both", "keep one kind in metrics.")
            metrics_ok = False
    ks = [topk] if _is_int(topk) else topk
    topk_ok = isinstance(ks, list) and ks and all(_int_at_least(1)(k) for k in ks)
    if not topk_ok:
        problems.add("topk", topk, "an integer >= 1 or a non-empty list of them", "set topk: [10, 20].")
    valid_metric = settings.get("valid_metric")
    if not isinstance(valid_metric, str):
        problems.add("valid_metric", valid_metric, "a metric name such as NDCG@10", "set valid_metric: NDCG@10.")
    elif metrics_ok and topk_ok:
        computed = []
        for metric in names:
            need = metrics_dict[metric.lower()].metric_need
            at_k = "rec.topk" in need or "rec.items" in need  # RecBole names these '<metric>@<k>'
            computed += [f"{metric}@{k}" for k in ks] if at_k else [metric]
        if valid_metric.lower() not in {name.lower() for name in computed}:
            close = _closest(valid_metric, computed)
            problems.add("valid_metric", valid_metric, f"one of the metrics this run computes (metrics x topk: "
                         f"{', '.join(computed)})", (f"did you mean '{close}'? Or " if close else "") +
                         "add the metric to metrics and its k to topk.")


def _check_eval_args(settings, problems):
    eval_args = settings.get("eval_args")
    if not isinstance(eval_args, dict):
        problems.add("eval_args", eval_args, "a mapping with keys among split, order, group_by, mode",
                     "set eval_args: {split: {'LS': 'valid_and_test'}, order: TO, group_by: user, mode: full}.")
        return
    for key in eval_args:
        if key not in EVAL_ARGS_KEYS:
            close = _closest(key, EVAL_ARGS_KEYS)
            problems.add("eval_args", eval_args, f"a mapping with keys among {', '.join(EVAL_ARGS_KEYS)} ('{key}' is "
                         "none)",
                         f"did you mean '{close}'?" if close else f"drop '{key}'.")
    split = eval_args.get("split", {"RS": [0.8, 0.1, 0.1]})
    mode, ratio = (next(iter(split)), next(iter(split.values()))) if isinstance(split, dict) and len(split) == 1 \
        else (None, None)
    if mode == "LS" and ratio not in LEAVE_ONE_OUT_MODES:
        problems.add("eval_args.split", split, f"{{'LS': one of {', '.join(LEAVE_ONE_OUT_MODES)}}}",
                     "set eval_args.split: {'LS': 'valid_and_test'}.")
    elif mode in ("RS", "TS"):
        if not (isinstance(ratio, list) and len(ratio) == 3 and all(_is_number(r) and r >= 0 for r in ratio)
                and sum(ratio) > 0):
            problems.add("eval_args.split", split, f"{{'{mode}': three ratios >= 0 for train, valid, test}}",
                         f"set eval_args.split: {{'{mode}': [0.8, 0.1, 0.1]}}.")
    elif mode not in ("RS", "TS", "LS"):
        problems.add("eval_args.split", split, "one of {'LS': 'valid_and_test'} (leave-one-out), {'RS': [0.8, 0.1, "
                     "0.1]} (random ratios), {'TS': [0.8, 0.1, 0.1]} (temporal ratios)",
                     "set eval_args.split: {'LS': 'valid_and_test'}.")
    if eval_args.get("order", "RO") not in ("RO", "TO"):
        problems.add("eval_args.order", eval_args["order"], "RO (random order) or TO (time order)",
                     "set eval_args.order: TO.")
    group_by = eval_args.get("group_by", "user")
    if not (group_by is None or group_by in ("user", "none", "None")):
        problems.add("eval_args.group_by", group_by, "user or none", "set eval_args.group_by: user.")
    modes = eval_args.get("mode", "full")
    modes = {"valid": modes, "test": modes} if not isinstance(modes, dict) else modes
    for phase, value in modes.items():
        if phase not in ("valid", "test") or not (isinstance(value, str) and re.fullmatch(
                r"full|labeled|(uni|pop)[1-9]\d*", value)):
            problems.add("eval_args.mode", eval_args.get("mode"), "full, labeled, uni<N> or pop<N> (N sampled "
                         "negatives), or {valid: ..., test: ...}", "set eval_args.mode: full.")
            break


def _check_gpu_id(settings, problems):
    gpu_id = settings.get("gpu_id")
    parts = [gpu_id] if _is_int(gpu_id) else list(gpu_id) if isinstance(gpu_id, (tuple, list)) else \
        str(gpu_id).split(",") if isinstance(gpu_id, str) and gpu_id.strip() else [] if gpu_id in ("", None) else None
    if parts is None or not all(str(part).strip().isdigit() for part in parts):
        problems.add("gpu_id", gpu_id, "GPU ids separated by commas ('0', '0,1'), or '' for the CPU",
                     "set gpu_id: '0' (quoted), or gpu_id: '' to train on the CPU.")


def check_config(config, properties_folder):
    """All checks on `config.final_config_dict` before RecBole processes it (its own checks raise tracebacks on
    some of the same mistakes). Warns about unknown keys first, then raises one ConfigError listing every failure."""
    settings, internal = config.final_config_dict, config.internal_config_dict
    if settings.get("local_rank", 0) in (0, None):
        warn_unknown_keys(config, properties_folder)
    problems = _Problems(config)
    _check_rules(settings, internal, config.model_class.type, problems)
    _check_evaluation(settings, problems)
    _check_eval_args(settings, problems)
    _check_gpu_id(settings, problems)
    if problems.lines:
        raise ConfigError("\n".join(problems.lines))


# -- unknown keys ---------------------------------------------------------------------------------------------------
# Keys read by code through a variable name, or set by the launcher and the run script.
ALWAYS_KNOWN = {"model", "dataset", "config_files", "local_rank", "nproc", "world_size", "offset", "ip", "port",
                "resume", "explain_users", "backend"}
_TOP_LEVEL_KEY = re.compile(r"^([A-Za-z_][\w]*)\s*:", re.M)
_KEY_READ = re.compile(r"""(?:config|settings)\w*\s*(?:\[|\.get\(|,)\s*["']([A-Za-z_]\w*)["']""")


def _yaml_keys(folder):
    keys = set()
    for path in glob.glob(os.path.join(folder, "**", "*.yaml"), recursive=True):
        with open(path, encoding="utf-8") as f:
            keys.update(_TOP_LEVEL_KEY.findall(f.read()))
    for path in glob.glob(os.path.join(folder, "**", "*.hyper"), recursive=True):
        with open(path, encoding="utf-8") as f:
            keys.update(line.split()[0] for line in f if line.split())
    return keys


def _keys_read_by_code(package_folder):
    keys = set()
    for path in glob.glob(os.path.join(package_folder, "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            keys.update(_KEY_READ.findall(f.read()))
    return keys


@functools.lru_cache(maxsize=None)
def known_keys(properties_folder):
    """Every key some model or some part of RecBole or this plugin reads: RecBole's YAML files (all model types) and
    argument lists, the keys its code and ours read (`config["k"]`, `config.get("k")`), our `properties/` YAML and
    search spaces. Read once per process (about 0.1 s)."""
    import recbole

    import recbole_reason

    recbole_folder = os.path.dirname(recbole.__file__)
    keys = set(ALWAYS_KNOWN)
    for name in ("general_arguments", "training_arguments", "evaluation_arguments", "dataset_arguments"):
        keys.update(getattr(argument_list, name))
    keys |= _yaml_keys(os.path.join(recbole_folder, "properties")) | _keys_read_by_code(recbole_folder)
    keys |= _yaml_keys(properties_folder) | _keys_read_by_code(os.path.dirname(recbole_reason.__file__))
    return frozenset(keys)


def warn_unknown_keys(config, properties_folder):
    """One warning per key the user set that nothing reads, with the closest known key."""
    known = known_keys(properties_folder)
    sources = _Problems(config)
    for key in config.external_config_dict:
        if key in known:
            continue
        close = _closest(key, known)
        getLogger().warning(
            f"config key '{key}' (set in {sources.source(key)}) is read by no model and no part of RecBole or "
            f"recbole-reason: it has no effect." + (f" Did you mean '{close}'?" if close else "")
        )


# -- device ---------------------------------------------------------------------------------------------------------
def machine_gpu_count():
    """NVIDIA GPUs on this machine, whatever CUDA_VISIBLE_DEVICES says (RecBole has set it to gpu_id by now);
    0 for a torch build without CUDA."""
    import torch

    if torch.version.cuda is None:
        return 0
    try:
        count = torch.cuda._raw_device_count_nvml()  # NVML: the physical count (-1 if NVML is unavailable)
    except Exception:  # noqa: BLE001 (a private helper: any failure means "unknown")
        count = -1
    if count < 0 and os.path.isdir("/proc/driver/nvidia/gpus"):
        count = len(os.listdir("/proc/driver/nvidia/gpus"))
    return max(count, 0)


def check_device(settings, explicit):
    """After RecBole's `_init_device` (one process): `gpu_id` names GPUs, but torch sees fewer. `explicit`: the user
    set gpu_id (RecBole's default '0' on a machine without a GPU is the documented CPU fallback)."""
    import torch

    gpu_id = settings["gpu_id"]
    named = [part for part in str(gpu_id).split(",") if part.strip()]
    if not named:
        return
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible >= len(named):
        return
    machine = machine_gpu_count()
    if machine > 0 and visible == 0:
        raise ConfigError(
            f"gpu_id = '{gpu_id}': this machine has {machine} GPU(s), ids 0 to {machine - 1}, not the one(s) named, "
            f"so the run would train on the CPU without a word. Fix: --gpu_id=0 (a GPU it has), or gpu_id: '' to "
            "train on the CPU."
        )
    if machine > 0:
        getLogger().warning(f"gpu_id = '{gpu_id}': this machine has {machine} GPU(s); {visible} of the {len(named)} "
                            "named exist, and this one-process run trains on the first of them.")
    elif explicit:
        why = (f"this torch build has no CUDA (torch {torch.__version__})" if torch.version.cuda is None
               else "this machine has no GPU that torch can use")
        getLogger().warning(f"gpu_id = '{gpu_id}' names a GPU, but {why}: this run trains on the CPU. Set gpu_id: '' "
                            "to choose the CPU without this warning.")
