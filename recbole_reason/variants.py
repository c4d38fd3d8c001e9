"""Named variants for comparisons: the plugin models, their no-reasoning controls and their paper settings.

A comparison can only attribute a gain to reasoning against a *control*: the same model at its own settings
(temperature, dropout, size, training stages) with the reasoning switched off. `run_compare.py --models` and
`bench/gpu_plan.sh` take these labels; `tables.summarize` marks each control's row and tests the model against it
(per-user paired tests) as well as against the baseline.

A variant is a dict:
- label, model, config: what runs (config: overrides on top of the shared config files);
- control_of: the label this row is the no-reasoning control of;
- select: rows with one `select` name are one model tuned over a grid: the table adds a row `select` holding the
  member with the best mean validation score (`valid_metric`), with its member named;
- from_run_of + attributes: an inference-time control, evaluated on the trained model of `from_run_of` after its
  test with model attributes changed (no training of its own);
- note: where it differs from its paper (shown under the table);
- part: the GPU plan's call it runs in (bench/gpu_plan.sh PART=...; sized in README "GPU plan"), SASRec in every one.

Backbone sizes come from the shared config file (bench/configs/*.yaml: d = 64, inner 256, 2 layers, 2 heads, the
same for SASRec and every Transformer model); the notes name where a paper uses other values.
"""

TAU_GRID = (0.07, 0.5, 1.0)  # ReaRec's tau: official code 0.07, the authors' fork 0.5, SASRec's implicit 1
REARE_PRL = {"rearec_mode": "prl", "reason_step": 2}


def _rearec_tau(tau, reason_step):
    name = "ReaRec" if reason_step else "ReaRec-K0"
    return {"label": name if tau == TAU_GRID[0] else f"{name}-tau{tau:g}", "model": "ReaRec",
            "config": {**REARE_PRL, "reason_step": reason_step, "temperature": tau},
            "select": f"{name} (tau on valid)", "part": "rearec"}


VARIANTS = [
    {"label": "SASRec", "model": "SASRec", "config": {}},
    # ReaRec: PRL with K = 2 at the official temperature 0.07 and input dropout 0.2; K0 = the same model, no steps
    # (SASRec weight for weight, at ReaRec's tau and dropout).
    {**_rearec_tau(0.07, 2), "note": "d = 64 / inner 256 from the shared config (official 256 / 300: ReaRec-official)"},
    {**_rearec_tau(0.07, 0), "control_of": "ReaRec"},
    *[_rearec_tau(tau, 2) for tau in TAU_GRID[1:]],
    *[{**_rearec_tau(tau, 0), "control_of": f"ReaRec-tau{tau:g}"} for tau in TAU_GRID[1:]],
    {"label": "ReaRec-official", "model": "ReaRec", "config": {**REARE_PRL, "hidden_size": 256, "inner_size": 300},
     "note": "the official code's size d = 256 / inner 300", "part": "rearec-official"},
    {"label": "ReaRec-official-K0", "model": "ReaRec", "config": {**REARE_PRL, "reason_step": 0, "hidden_size": 256,
                                                                "inner_size": 300}, "control_of": "ReaRec-official",
     "part": "rearec-official"},
    # LARES: T1 = the trained model evaluated with one recurrence (no latent reasoning loop at test time).
    {"label": "LARES", "model": "LARES", "config": {},
     "note": "sequence length and batch from the shared config (official 20 / 1024: LARES-official)", "part": "lares"},
    {"label": "LARES-T1", "model": "LARES", "from_run_of": "LARES", "attributes": {"test_recurrence": 1},
     "control_of": "LARES", "part": "lares"},
    {"label": "LARES-official", "model": "LARES", "config": {"MAX_ITEM_LIST_LENGTH": 20, "train_batch_size": 1024},
     "note": "official sequence length 20 and batch 1024 (another sequence length: not paired with the other rows)",
     "part": "lares-official"},
    # R2ec: the control evaluates the trained model with constant reasoning tokens of the same length.
    {"label": "R2ec", "model": "R2ec", "config": {}, "note": "tiny closed-vocabulary LM backbone (paper: Qwen / Gemma)",
     "part": "r2ec"},
    {"label": "R2ec-constant", "model": "R2ec", "from_run_of": "R2ec", "attributes": {"reasoning_content": "constant"},
     "control_of": "R2ec", "part": "r2ec"},
    # REG4Rec: CORP (category-consistent path pruning) switched off at inference on the same trained model.
    {"label": "REG4Rec", "model": "REG4Rec", "config": {}, "part": "reg4rec"},
    {"label": "REG4Rec-noCORP", "model": "REG4Rec", "from_run_of": "REG4Rec", "attributes": {"corp": "off"},
     "control_of": "REG4Rec", "part": "reg4rec"},
]
CATALOG = {variant["label"]: variant for variant in VARIANTS}
PLAN = [v["label"] for v in VARIANTS]  # every row: bench/gpu_plan.sh's table
PARTS = list(dict.fromkeys(v["part"] for v in VARIANTS if v.get("part")))


def plan_part(parts):
    """The PLAN labels of the given parts ('all' = every one), SASRec first: bench/gpu_plan.sh's --models."""
    parts = [p.strip().lower() for p in parts.split(",")] if isinstance(parts, str) else list(parts)
    unknown = sorted(set(parts) - set(PARTS) - {"all"})
    if unknown:
        raise ValueError(f"unknown plan part(s) {unknown}: choose from {PARTS} or all")
    return [label for label in PLAN if label == "SASRec" or "all" in parts or CATALOG[label].get("part") in parts]


def variant(label):
    """The catalogued variant of `label` (a copy), or None."""
    found = CATALOG.get(label)
    return None if found is None else {**found, "config": dict(found.get("config") or {})}
