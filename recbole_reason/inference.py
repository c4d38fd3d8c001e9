"""Use a trained model: RecBole's `load_data_and_model`, and top-k recommendations for users.

    from recbole_reason import load_data_and_model, recommend
    config, model, dataset, train_data, valid_data, test_data = load_data_and_model("saved/ReaRec-x.pth")
    recommend(model, dataset, test_data, users=["196", "186"], k=10)      # [{'user', 'items', 'titles', ...}]

    from recbole.utils.case_study import full_sort_topk                 # RecBole's case-study helpers work too
    full_sort_topk(dataset.token2id(dataset.uid_field, ["196"]), model, test_data, k=10, device=config["device"])

`load_data_and_model` is `recbole.quick_start.load_data_and_model` (same signature, same return value) for plugin
models and RecBole's baselines, without importing `recbole.quick_start` (ray), with the checkpoint checks of
training (model, weight-shaping settings, item ids), and for checkpoints written on another machine: a CUDA
checkpoint loads on a CPU-only machine, and `data_path` (config_dict) is read as in training (see
`apply_evaluation_settings`).

`recommend` scores a user's whole known sequence: the last test-split row (the history up to the held-out item)
with the held-out item appended, i.e. what comes next after everything the data holds about the user. Items the
user already interacted with are excluded unless keep_history=True. A model with an `explain` method (R2ec)
adds its generated reasoning.
"""

import os
from logging import getLogger

import torch
from recbole.data import data_preparation
from recbole.utils import ModelType, init_seed

from recbole_reason.checkpoint import checkpoint_mismatch, item_id_fingerprint
from recbole_reason.compat import load_checkpoint
from recbole_reason.data.item_features import item_title
from recbole_reason.distributed import init_rank_logger
from recbole_reason.utils import create_dataset, get_model



def apply_evaluation_settings(config, config_dict):
    """Set evaluation-side settings (data_path, eval_batch_size, ...) on a checkpoint's stored config.

    `data_path` means what it means to a training run, the folder that holds <dataset>/, so it is joined with the
    dataset name as RecBole's Config does; ml-100k always reads the copy inside this machine's recbole package, as in
    training (the stored path may be another machine's, e.g. the GPU machine's site-packages)."""
    for key, value in (config_dict or {}).items():
        config[key] = os.path.join(value, config["dataset"]) if key == "data_path" else value
    if config["dataset"] == "ml-100k":
        import recbole.config

        config["data_path"] = os.path.join(os.path.dirname(os.path.realpath(recbole.config.__file__)),
                                           "..", "dataset_example", "ml-100k")
    return config


def read_checkpoint(model_file):
    """The checkpoint dict of a training run's .pth file, on the CPU; one clear error if it is not one."""
    if not os.path.isfile(str(model_file)):
        raise FileNotFoundError(f"Checkpoint {model_file} does not exist: pass a .pth file written by a training "
                                "run (its path is in the run's log, under saved/ by default).")
    checkpoint = load_checkpoint(model_file, map_location="cpu")
    if not isinstance(checkpoint, dict) or checkpoint.get("config") is None or "state_dict" not in checkpoint:
        raise ValueError(f"{model_file} is not a RecBole checkpoint (no config and state_dict): pass a .pth file "
                         "written by a training run.")
    return checkpoint


def rebuild_from_checkpoint(model_file, config_dict=None, check_model=None):
    """(checkpoint, config, dataset, (train, valid, test) loaders, model) of a training run's checkpoint: the dataset
    filtered and split as in that run (its stored config and seed), the model rebuilt on this machine's device, its
    weights not loaded yet. config_dict: evaluation-side settings on top of the stored config (e.g.
    {'data_path': '../shared/data'} for a checkpoint trained on another machine, 'eval_batch_size', 'gpu_id').
    check_model(name, model_class) may refuse the model before any data is read."""
    checkpoint = read_checkpoint(model_file)
    config = apply_evaluation_settings(checkpoint["config"], config_dict)
    model_class = get_model(config["model"])
    if check_model is not None:
        check_model(config["model"], model_class)
    if config["device"].type == "cuda" and not torch.cuda.is_available():
        config["device"] = torch.device("cpu")
    init_seed(config["seed"], config["reproducibility"])
    init_rank_logger(config)  # this evaluation's own log file and TensorBoard folder, not the training run's
    logger = getLogger()
    logger.info(config)
    dataset = create_dataset(config)
    logger.info(dataset)
    loaders = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = model_class(config, loaders[0]._dataset).to(config["device"])
    return checkpoint, config, dataset, loaders, model


def load_data_and_model(model_file, config_dict=None):
    """RecBole's `load_data_and_model`: (config, model, dataset, train_data, valid_data, test_data) of a checkpoint,
    rebuilt as in its training run (`rebuild_from_checkpoint`) with its weights loaded after the checkpoint checks."""
    checkpoint, config, dataset, (train_data, valid_data, test_data), model = rebuild_from_checkpoint(
        model_file, config_dict)
    problem = checkpoint_mismatch(checkpoint, model_file, config, model, item_id_fingerprint(dataset))
    if problem:
        raise ValueError(problem)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data


# -- recommending ----------------------------------------------------------------------------------------------------
def internal_user_ids(dataset, users):
    """External user tokens -> internal ids; an unknown user is one clear error naming it and the dataset."""
    uid_field = dataset.uid_field
    known = dataset.field2token_id[uid_field]
    unknown = [str(user) for user in users if str(user) not in known]
    if unknown:
        examples = ", ".join(list(known)[1:4])  # id 0 is [PAD]
        raise ValueError(f"Unknown user {', '.join(repr(u) for u in unknown)}: not a {uid_field} of dataset "
                         f"'{dataset.dataset_name}' (its ids look like {examples}, ...). Fix: pass --users with ids "
                         "from the dataset's .inter file.")
    return [known[str(user)] for user in users]


def next_item_rows(test_dataset, uids, item_seq_field, item_seq_len_field, list_suffix):
    """For each user, the input that predicts what comes after their last interaction: the user's last test-split
    row (sequence up to the held-out item) with the held-out item appended to every `<field><list_suffix>` list
    (items, and ratings / timestamps where the model reads them); a full sequence drops its oldest item.
    The row's own target fields keep the held-out item's values (a timestamp gap of 0 to the last item)."""
    inter = test_dataset.inter_feat
    uid_field = test_dataset.uid_field
    rows = []
    for user, uid in uids.items():
        found = torch.nonzero(inter[uid_field] == uid).squeeze(1)
        if len(found) == 0:
            raise ValueError(f"User {user!r} has no sequence in the test split (too few interactions after "
                             "RecBole's filters): nothing to recommend from.")
        rows.append(int(found[-1]))  # RecBole keeps rows in time order: the last row has the longest history
    batch = inter[torch.tensor(rows)]
    lengths = batch[item_seq_len_field].long()
    width = batch[item_seq_field].shape[1]
    full = lengths >= width
    position = torch.where(full, torch.full_like(lengths, width - 1), lengths)
    rows = torch.arange(len(lengths))
    for name in list(batch.columns):
        base = name[: -len(list_suffix)]
        if not name.endswith(list_suffix) or base not in batch.columns:
            continue
        sequence = batch[name].clone()
        sequence[full] = torch.roll(sequence[full], shifts=-1, dims=1)
        sequence[rows, position] = batch[base].to(sequence.dtype)
        batch.interaction[name] = sequence
    batch.interaction[item_seq_len_field] = torch.clamp(lengths + 1, max=width).to(batch[item_seq_len_field].dtype)
    return batch


def history_items(dataset, uid, item_seq_field):
    """Internal ids of every item the user interacted with. After `data_preparation` a sequential dataset holds one
    row per target (the user's first item only inside the `item_id_list` of later rows), so both are read."""
    inter = dataset.inter_feat
    rows = inter[dataset.uid_field] == uid
    items = [inter[dataset.iid_field][rows]]
    if item_seq_field in inter.columns:
        items.append(inter[item_seq_field][rows].flatten())
    items = torch.cat(items).unique()
    return items[items > 0]


def recommend(model, dataset, test_data, users, k=10, keep_history=False, reasoning=True):
    """Top-k items for each user (external ids, e.g. ['196', '186']), scored on the user's whole known sequence
    (`next_item_rows`). dataset, test_data: as `load_data_and_model` returns them. Returns one dict per user:
    {'user', 'items' (external ids, best first), 'titles' (or None per item without a title field),
    'scores', 'history_size', 'reasoning' (a model with `explain`, e.g. R2ec; else None)}."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if model.type != ModelType.SEQUENTIAL:
        raise ValueError(f"recommend supports sequential models; {type(model).__name__} is not one. For other "
                         "models use recbole.utils.case_study.full_sort_topk on what load_data_and_model returns.")
    users = list(dict.fromkeys(str(user) for user in ([users] if isinstance(users, (str, int)) else users)))
    if not users:
        raise ValueError("users is empty: give at least one user id, e.g. --users 196,186")
    uids = dict(zip(users, internal_user_ids(dataset, users)))
    histories = {user: history_items(dataset, uid, model.ITEM_SEQ) for user, uid in uids.items()}
    n_candidates = dataset.item_num - 1 - (0 if keep_history else max(len(h) for h in histories.values()))
    if k > n_candidates:
        raise ValueError(f"k = {k} but only {n_candidates} items can be recommended to these users "
                         f"({dataset.item_num - 1} items{'' if keep_history else ', less their history'}).")
    test_dataset = test_data.dataset
    batch = next_item_rows(test_dataset, uids, model.ITEM_SEQ, model.ITEM_SEQ_LEN, test_dataset.config["LIST_SUFFIX"])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        scores = model.full_sort_predict(batch.to(device)).view(len(users), -1).float().cpu()
    model.train(was_training)
    scores[:, 0] = -torch.inf  # [PAD]
    if not keep_history:
        for row, user in enumerate(users):
            scores[row, histories[user]] = -torch.inf
    top = torch.topk(scores, k)
    explanations = {}
    if reasoning and hasattr(model, "explain"):  # on the very rows just scored: the test split's, item appended
        explained = model.explain(test_dataset.copy(batch), users)
        explanations = {str(e.get("user")): e.get("reasoning") for e in explained}
    out = []
    for row, user in enumerate(users):
        items = top.indices[row].tolist()
        out.append({
            "user": user,
            "items": [str(token) for token in dataset.id2token(dataset.iid_field, items)],
            "titles": [item_title(dataset, item) for item in items],
            "scores": [float(score) for score in top.values[row]],
            "history_size": int(len(histories[user])),
            "reasoning": explanations.get(user),
        })
    return out


def recommend_from_checkpoint(model_file, users, k=10, keep_history=False, config_dict=None):
    """load_data_and_model + recommend: the Python API of `run_recbole_reason.py --recommend`."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:  # before the data is loaded
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    _, model, dataset, _, _, test_data = load_data_and_model(model_file, config_dict)
    return recommend(model, dataset, test_data, users, k=k, keep_history=keep_history)


def write_recommendations(recommendations, path):
    """CSV (one row per user and rank) or JSON (the list of dicts), by the file's extension."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".csv", ".json"):
        raise ValueError(f"--output {path}: the file name must end in .csv or .json")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if extension == ".json":
        import json

        with open(path, "w", encoding="utf-8") as f:
            json.dump(recommendations, f, indent=1, ensure_ascii=False)
        return path
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user", "rank", "item_id", "title", "score", "reasoning"])
        for entry in recommendations:
            reasoning = " ".join(entry["reasoning"]) if isinstance(entry["reasoning"], list) else entry["reasoning"]
            for rank, (item, title, score) in enumerate(zip(entry["items"], entry["titles"], entry["scores"]), 1):
                writer.writerow([entry["user"], rank, item, title or "", f"{score:.6g}", reasoning or ""])
    return path


def format_recommendations(recommendations):
    """The terminal text: per user, the ranked items with their titles, and the reasoning where there is one."""
    lines = []
    for entry in recommendations:
        lines.append(f"user {entry['user']} ({entry['history_size']} items in the history)")
        if entry["reasoning"]:
            reasoning = entry["reasoning"]
            lines.append("  reasoning: " + (" ".join(reasoning) if isinstance(reasoning, list) else str(reasoning)))
        for rank, (item, title, score) in enumerate(zip(entry["items"], entry["titles"], entry["scores"]), 1):
            lines.append(f"  {rank:>3}. {item:<10} {title or '':<50} {score:.4f}")
    return "\n".join(lines)
