"""Speed levers (docs/performance.md): every faster path gives the numbers of the slower one it replaced.

REG4Rec: KV-cached decoding, posting-list candidates, CRSS on the codebook view and incremental CORP == the previous
full-recompute beam search (kept below as `reference_beam_search`) and PARS sampler; PARS log-probs with the memory
shared by the G paths == repeated memory. R2ec: K RecPO rollouts sharing one prompt forward == K prompt copies; the
item table is encoded once per evaluation. LARES: the last layer of the last step at the readout position only ==
the full step; the RPT reference's pre-block once per batch; fused GELU. Mixed precision within tolerance.
"""

import pytest
import torch
from recbole.data import data_preparation
from recbole.utils import init_seed

from conftest import DATA_PATH, tiny_config
from recbole_reason import create_dataset
from recbole_reason.data import mpq_tokenizer as mpq
from recbole_reason.model.sequential_recommender.reg4rec import (
    BOS,
    N_SPECIAL,
    PAD,
    PRUNED_OFFSET,
    UNREACHED,
    DecodingCache,
    REG4Rec,
    corp_consistency,
    corp_consistency_after,
)


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one intra-op thread for tiny tensors


def _config(model, **overrides):
    return tiny_config(model, {"dataset": "tiny", "data_path": DATA_PATH, **overrides})


# =================================================================================================================
# REG4Rec
# =================================================================================================================
REG4REC = {
    "mpq_num_codebooks": 3, "mpq_codebook_size": 12, "mpq_epochs": 2, "mpq_hidden_dim": 16, "mpq_latent_dim": 4,
    "mpq_input_dim": 8, "d_model": 16, "n_heads": 2, "n_enc_layers": 1, "n_dec_layers": 2, "ffn_dim": 32,
    "beam_size": 20, "beam_chunk_size": 7, "MAX_ITEM_LIST_LENGTH": 5, "corp_threshold": 0.6, "n_pseudo_cat": 4,
}


@pytest.fixture(scope="module")
def reg4rec(tmp_path_factory):
    config = _config("REG4Rec", checkpoint_dir=str(tmp_path_factory.mktemp("saved")), **REG4REC)
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    tokens = mpq.build_item_tokens(config, train_data._dataset)
    init_seed(2020, True)
    model = REG4Rec(config, train_data._dataset).eval()
    model.set_item_tokens(tokens)
    return model, next(iter(train_data))


# -- the previous implementation (bitset candidates, the decoder re-run over whole prefixes), as the reference ----
def _reference_valid_tokens(model, candidates, step):
    posting = model.posting()
    if step == 0:
        return posting.any(1).unsqueeze(0).expand(candidates.size(0), -1)
    rows, items = candidates.nonzero(as_tuple=True)
    valid = torch.zeros(candidates.size(0), model.vocab_size, dtype=torch.bool)
    tokens = model.item_vocab_tokens(items)
    valid[rows.unsqueeze(1).expand_as(tokens), tokens] = True
    valid[:, PAD] = False
    return valid


def _reference_scatter_final(model, out, candidates, codebook, codebook_logp, score, pruned, B, w):
    rows, items = candidates.nonzero(as_tuple=True)
    local = model.item2tokens[items, codebook[rows]]
    path_score = score[rows] + codebook_logp[rows, local]
    keep = torch.isfinite(path_score)
    rows, items, path_score = rows[keep], items[keep], path_score[keep]
    path_score = path_score.clamp(min=-PRUNED_OFFSET / 2) - PRUNED_OFFSET * pruned[rows].float()
    users = rows // w
    if model.beam_merge == "max":
        out.view(-1).scatter_reduce_(0, users * out.size(1) + items, path_score, reduce="amax", include_self=False)
    else:
        shift = torch.full((B,), float("-inf")).scatter_reduce(0, users, path_score, "amax")
        mass = torch.zeros_like(out).view(-1).index_add_(0, users * out.size(1) + items, torch.exp(path_score - shift[users]))
        mass = mass.view_as(out)
        out.copy_(torch.where(mass > 0, torch.log(mass.clamp(min=1e-30)) + shift.unsqueeze(1), out))


@torch.no_grad()
def reference_beam_search(model, item_seq, item_seq_len, W, corp):
    B, M, D = item_seq.size(0), model.M, model.D
    memory, padding = model.encode(item_seq, item_seq_len)
    posting = model.posting()
    tokens = torch.full((B, 1, 0), BOS, dtype=torch.long)
    used = torch.zeros(B, 1, M, dtype=torch.bool)
    score = torch.zeros(B, 1)
    pruned = torch.zeros(B, 1, dtype=torch.bool)
    candidates = posting.any(0).view(1, 1, -1).expand(B, 1, -1)
    out = torch.full((B, model.n_items), UNREACHED)
    for step in range(M):
        w = tokens.size(1)
        prefixes = torch.cat([torch.full((B, w, 1), BOS, dtype=torch.long), tokens], 2)
        logits = model.beam_logits(prefixes, memory, padding).reshape(B * w, -1)
        flat_candidates = candidates.reshape(B * w, -1)
        used_flat = used.reshape(B * w, M)
        allowed = model.codebook_mask(used_flat) & _reference_valid_tokens(model, flat_candidates, step)
        logp = model.masked_log_softmax(logits, model.codebook_mask(used_flat)).masked_fill(~allowed, float("-inf"))
        codebook = logp[:, N_SPECIAL:].reshape(-1, M, D).max(-1).values.argmax(-1)
        step_mask = allowed & (model.token_codebook.unsqueeze(0) == codebook.unsqueeze(1))
        codebook_logp = logp.masked_fill(~step_mask, float("-inf"))[:, N_SPECIAL:].reshape(B * w, M, D)
        codebook_logp = codebook_logp[torch.arange(B * w), codebook]
        total = (score.reshape(B * w, 1) + codebook_logp).reshape(B, w * D)
        if step == M - 1:
            _reference_scatter_final(model, out, flat_candidates, codebook, codebook_logp, score.reshape(-1), pruned.reshape(-1), B, w)
            break
        token_ids = N_SPECIAL + codebook.reshape(B, w, 1) * D + torch.arange(D)
        inconsistent = torch.zeros(B, w, D, dtype=torch.bool)
        if corp == "rule" and step + 1 == model.corp_step:
            path_cats = torch.cat([model.token_cat[tokens].unsqueeze(2).expand(-1, -1, D, -1),
                                   model.token_cat[token_ids].unsqueeze(-1)], dim=-1)
            inconsistent = corp_consistency(path_cats) < model.corp_threshold
        parent_pruned = pruned.unsqueeze(-1).expand(-1, -1, D)
        rank = total - PRUNED_OFFSET * (inconsistent | parent_pruned).reshape(B, w * D).float()
        k = min(W, w * D)
        top = rank.topk(k, dim=1).indices
        parent = top // D
        gather = lambda x: x.gather(1, parent.view(B, k, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))
        new_token = token_ids.reshape(B, w * D).gather(1, top)
        tokens = torch.cat([gather(tokens), new_token.unsqueeze(-1)], dim=-1)
        used = gather(used).clone()
        used.scatter_(2, ((new_token - N_SPECIAL) // D).unsqueeze(-1), True)
        candidates = gather(candidates) & posting[new_token]
        pruned = (inconsistent | parent_pruned).reshape(B, w * D).gather(1, top)
        score = total.gather(1, top)
    return out


def test_cached_decoding_equals_rerunning_the_decoder_over_whole_prefixes(reg4rec):
    model, batch = reg4rec
    memory, padding = model.encode(batch["item_id_list"][:4], batch["item_length"][:4])
    cache = DecodingCache(model, memory, padding)
    prefixes = torch.full((4, 1, 1), BOS)
    with torch.no_grad():
        for step in range(model.M):
            full = model.beam_logits(prefixes, memory, padding)
            cached = model.beam_logits(prefixes, cache, padding)
            assert cached.shape == full.shape and torch.allclose(cached, full, atol=1e-5)
            # branch: 3 children of random parents, so the cache must follow the reordering
            parent = torch.randint(0, prefixes.size(1), (4, 3))
            cache.reorder(parent)
            prefixes = prefixes.gather(1, parent.unsqueeze(-1).expand(-1, -1, prefixes.size(2)))
            prefixes = torch.cat([prefixes, torch.randint(N_SPECIAL, model.vocab_size, (4, 3, 1))], dim=2)
    with pytest.raises(RuntimeError, match="cache holds"):
        model.beam_logits(prefixes[:, :, :2], cache, padding)  # a cache out of step with the prefixes is refused


def test_posting_lists_hold_exactly_the_items_of_each_token(reg4rec):
    model, _ = reg4rec
    lists, item_tokens, in_use = model.decoding_tables()
    posting = model.posting()
    for token in range(model.vocab_size):
        items = lists[token][lists[token] > 0]
        assert items.tolist() == torch.nonzero(posting[token]).squeeze(1).tolist()  # ascending, complete
    assert torch.equal(in_use, posting.any(1)) and torch.equal(item_tokens, model.item_vocab_tokens(torch.arange(model.n_items)))
    assert model.decoding_tables() is model.decoding_tables()  # built once per token table


def test_incremental_corp_equals_corp_on_the_extended_paths():
    torch.manual_seed(0)
    for s in (0, 1, 2, 4):
        parent = torch.randint(0, 4, (6, 5, s))  # category 0 = unknown
        new = torch.randint(0, 4, (6, 5, 9))
        full = corp_consistency(torch.cat([parent.unsqueeze(2).expand(-1, -1, 9, -1), new.unsqueeze(-1)], -1))
        assert torch.equal(corp_consistency_after(parent, new), full)


@pytest.mark.parametrize("corp, merge", [("off", "max"), ("rule", "max"), ("rule", "logsumexp")])
def test_beam_search_gives_the_previous_implementations_scores(reg4rec, corp, merge):
    model, batch = reg4rec
    model.beam_merge = merge
    torch.manual_seed(1)
    # many categories: most two-token paths are inconsistent, so pruned paths refill the beams
    model.token_cat[N_SPECIAL:] = torch.randint(0, 30, (model.vocab_size - N_SPECIAL,))
    seq, length = batch["item_id_list"][:16], batch["item_length"][:16]
    try:
        new = model.beam_search(seq, length, corp=corp)
        old = reference_beam_search(model, seq, length, model.beam_size, corp)
    finally:
        model.beam_merge = "max"
    assert torch.equal(new <= UNREACHED, old <= UNREACHED)  # the same items reached
    assert torch.allclose(new, old, atol=1e-4, rtol=1e-6)
    if corp == "rule" and merge == "max":
        assert (old < -PRUNED_OFFSET / 2).logical_and(old > UNREACHED).any()  # CORP did prune something here
    assert torch.equal(new.topk(10).indices, old.topk(10).indices)


@pytest.mark.parametrize("support", ["remaining", "codebook"])
def test_pars_sampling_draws_the_same_paths_as_before(reg4rec, support):
    """sample_paths on the cache == the previous sampler (full decoder per step, bitset constraint), same seed; the
    stored masks and log-probs are over the policy's support (`pars_policy_support`: every remaining codebook, as
    the beam normalises, or the chosen codebook's valid tokens)."""
    model, batch = reg4rec
    kept, model.policy_support = model.policy_support, support
    memory, padding = model.encode(batch["item_id_list"][:8], batch["item_length"][:8])
    G, N = 4, 8 * 4
    torch.manual_seed(3)
    paths, masks, logp = model.sample_paths(memory, padding, G)
    model.policy_support = kept
    torch.manual_seed(3)
    posting = model.posting()
    candidates = posting.any(0).unsqueeze(0).expand(N, -1)
    used = torch.zeros(N, model.M, dtype=torch.bool)
    ref_paths = torch.full((N, 0), BOS, dtype=torch.long)
    ref_logp, ref_masks = [], []
    with torch.no_grad():
        for step in range(model.M):
            prefixes = torch.cat([torch.full((N, 1), BOS, dtype=torch.long), ref_paths], 1)
            logits = model.beam_logits(prefixes.view(8, G, -1), memory, padding).reshape(N, -1)
            allowed = model.codebook_mask(used) & _reference_valid_tokens(model, candidates, step)
            lp = model.masked_log_softmax(logits, model.codebook_mask(used)).masked_fill(~allowed, float("-inf"))
            codebook = lp[:, N_SPECIAL:].reshape(-1, model.M, model.D).max(-1).values.argmax(-1)
            step_mask = allowed & (model.token_codebook.unsqueeze(0) == codebook.unsqueeze(1))
            probs = torch.softmax((logits / model.sample_temperature).masked_fill(~step_mask, float("-inf")), dim=-1)
            token = torch.multinomial(probs, 1).squeeze(1)
            step_support = step_mask if support == "codebook" else model.codebook_mask(used)
            ref_logp.append(model.masked_log_softmax(logits / model.sample_temperature, step_support)
                            .gather(1, token.unsqueeze(1)).squeeze(1))
            ref_masks.append(step_support)
            ref_paths = torch.cat([ref_paths, token.unsqueeze(1)], 1)
            used[torch.arange(N), codebook] = True
            candidates = candidates & posting[token]
    assert torch.equal(paths, ref_paths) and torch.equal(masks, torch.stack(ref_masks, 1))
    assert torch.allclose(logp, torch.stack(ref_logp, 1), atol=1e-5)


def test_pars_log_probs_with_shared_memory_equal_repeated_memory_values_and_gradients(reg4rec):
    model, batch = reg4rec
    G = 4
    with torch.no_grad():
        memory, padding = model.encode(batch["item_id_list"][:8], batch["item_length"][:8])
        paths, masks, _ = model.sample_paths(memory, padding, G)
    encode = lambda: model.encode(batch["item_id_list"][:8], batch["item_length"][:8])  # with grad, one graph each
    memory, padding = encode()
    shared = model.path_log_probs(memory, padding, paths, masks)
    weights = torch.randn_like(shared)
    g_shared = _grads(model, (shared * weights).sum())
    memory, padding = encode()
    repeated = model.path_log_probs(memory.repeat_interleave(G, 0), padding.repeat_interleave(G, 0), paths, masks)
    assert torch.isfinite(shared).all() and torch.allclose(shared, repeated, atol=1e-5)
    g_repeated = _grads(model, (repeated * weights).sum())
    for name in g_repeated:
        assert torch.allclose(g_shared[name], g_repeated[name], atol=1e-5, rtol=1e-4), name
    with pytest.raises(ValueError, match="G paths per context"):
        model.path_log_probs(memory[:3], padding[:3], paths, masks)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# =================================================================================================================
# R2ec
# =================================================================================================================
R2EC = {
    "hidden_size": 16, "inner_size": 32, "n_layers": 2, "n_heads": 2, "MAX_ITEM_LIST_LENGTH": 5,
    "r2ec_hist_tokens_per_item": 2, "r2ec_max_reason_len": 4, "r2ec_group_size": 3, "r2ec_item_batch_size": 500,
    "r2ec_gen_top_k": 0,
}


@pytest.fixture(scope="module")
def r2ec():
    from recbole_reason import get_model

    config = _config("R2ec", **R2EC)
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    train_data, valid_data, _ = data_preparation(config, dataset)
    init_seed(config["seed"], True)
    model = get_model("R2ec")(config, train_data._dataset)
    model.set_dropout(0.0)  # as RecPO runs
    return model, next(iter(train_data))[:24], valid_data


@pytest.fixture
def few_reason_tokens(r2ec):
    """Reasoning over [ANS] and 3 items only, so that rollouts stop at [ANS] after different numbers of tokens."""
    from recbole_reason.model.sequential_recommender.r2ec import ANS

    model = r2ec[0]
    allowed = model.reason_allowed.clone()
    model.reason_allowed.zero_()
    model.reason_allowed[ANS] = True
    model.reason_allowed[model.vocab.item_offset + 1: model.vocab.item_offset + 4] = True
    yield
    model.reason_allowed.copy_(allowed)


def test_shared_prompt_generation_equals_generating_from_repeated_prompts(r2ec, few_reason_tokens):
    model, batch, _ = r2ec
    model.train()
    prompt, K = model.user_prompt(batch), 3
    assert model._shares_prompts()
    torch.manual_seed(5)
    shared = model.generate_reasoning(prompt, 1.0, 0, 1.0, group_size=K)
    torch.manual_seed(5)
    repeated = model.generate_reasoning(prompt.repeat_interleave(K, 0), 1.0, 0, 1.0)
    assert torch.equal(shared[0], repeated[0]) and torch.equal(shared[1], repeated[1])  # the same sampled tokens
    assert torch.allclose(shared[2], repeated[2], atol=1e-5)
    assert shared[1].sum(1).float().std() > 0  # rollouts of different lengths: the padding path is exercised


def test_shared_prompt_forward_equals_repeated_prompts_values_and_gradients(r2ec, few_reason_tokens):
    model, batch, _ = r2ec
    model.train()
    prompt, K = model.user_prompt(batch), 3
    torch.manual_seed(6)
    reasoning, sampled, _ = model.generate_reasoning(prompt, 1.0, 0, 1.0, group_size=K)
    h_shared, logp_shared, hidden = model.forward_with_reasoning(prompt, reasoning, group_size=K)
    assert hidden is None
    h_rep, logp_rep, _ = model.forward_with_reasoning(prompt.repeat_interleave(K, 0), reasoning)
    assert torch.allclose(h_shared, h_rep, atol=1e-5) and torch.allclose(logp_shared, logp_rep, atol=1e-5)
    weights = torch.randn_like(h_shared)
    g_shared = _grads(model, (h_shared * weights).sum() + logp_shared.sum())
    g_rep = _grads(model, (h_rep * weights).sum() + logp_rep.sum())
    assert g_shared.keys() == g_rep.keys()
    for name in g_rep:
        assert torch.allclose(g_shared[name], g_rep[name], atol=1e-5, rtol=1e-4), name


def test_recpo_loss_with_shared_prompts_equals_the_repeated_prompt_loss(r2ec, few_reason_tokens, monkeypatch):
    model, batch, _ = r2ec
    model.train()
    model.refresh_item_table()
    table = model.item_table.clone()
    torch.manual_seed(7)
    (token_shared, item_shared), stats_shared = model.recpo_loss(batch)
    model.item_table.copy_(table)
    monkeypatch.setattr(type(model), "_shares_prompts", lambda self: False)
    torch.manual_seed(7)
    (token_rep, item_rep), stats_rep = model.recpo_loss(batch)
    assert torch.allclose(token_shared, token_rep, atol=1e-5) and torch.allclose(item_shared, item_rep, atol=1e-5)
    assert stats_shared["reasoning_len"] == stats_rep["reasoning_len"]
    assert stats_shared["reward"] == pytest.approx(stats_rep["reward"], abs=1e-5)


def test_prompts_are_not_shared_while_dropout_is_active(r2ec):
    model, _, _ = r2ec
    model.train()
    model.set_dropout(0.1)
    try:
        assert not model._shares_prompts()  # K rollouts must draw K dropout masks over the prompt
        model.eval()
        assert model._shares_prompts()
    finally:
        model.set_dropout(0.0)


def test_item_table_is_encoded_once_per_evaluation_not_per_batch(r2ec, monkeypatch):
    model, _, valid_data = r2ec
    users = next(iter(valid_data))[0]
    batches = [users[:20], users[20:40], users[40:60]]  # three evaluation batches
    calls = []
    encode = model.encode_items
    monkeypatch.setattr(model, "encode_items", lambda items: calls.append(len(items)) or encode(items))
    model.eval()
    with torch.no_grad():
        scores = [model.full_sort_predict(b) for b in batches]
        assert sum(calls) == model.n_items  # the whole catalogue, once, for all batches
        model.train()
        model.eval()  # a new evaluation re-encodes (the weights may have changed in between)
        model.full_sort_predict(batches[0])
        assert sum(calls) == 2 * model.n_items
        for b, cached in zip(batches, scores):  # the cached table gives the scores of a fresh encoding
            fresh = model.rec_head(model.generate_reasoning(model.user_prompt(b))[2], model.encode_items(torch.arange(model.n_items)))
            assert torch.allclose(cached, fresh, atol=1e-4)


# =================================================================================================================
# LARES
# =================================================================================================================
@pytest.fixture(scope="module")
def lares():
    from recbole_reason.model.sequential_recommender.lares import LARES

    config = _config("LARES", n_pre_layers=1, n_core_layers=2, mean_recurrence=2, MAX_ITEM_LIST_LENGTH=8)
    init_seed(config["seed"], True)
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)

    def make(**overrides):
        saved = {key: config[key] for key in overrides}
        for key, value in overrides.items():
            config[key] = value
        try:
            init_seed(config["seed"], True)
            return LARES(config, train_data._dataset)
        finally:
            for key, value in saved.items():
                config[key] = value

    return make, next(iter(train_data))[:64]


def test_readout_only_last_layer_equals_the_full_last_step(lares):
    make, batch = lares
    model = make(hidden_dropout_prob=0.0)
    seq, length = batch["item_id_list"], batch["item_length"]
    assert (length < seq.size(1)).any()  # right-padded rows: the readout is not the last column
    for depth in (1, 3):
        noise = torch.randn(*seq.shape, model.hidden_size)
        full_state, full = model.reason(seq, length, depth, initial_state=noise)
        state, readout = model.reason(seq, length, depth, initial_state=noise, readout_only=True)
        assert state is None and torch.allclose(readout, full, atol=1e-5)
        weights = torch.randn_like(full)
        g_readout = _grads(model, (readout * weights).sum())
        g_full = _grads(model, (full * weights).sum())
        for name in g_full:
            assert torch.allclose(g_readout[name], g_full[name], atol=1e-5, rtol=1e-4), name
    model.eval()  # eval uses it: same scores as the full last step
    with torch.no_grad():
        _, full = model.reason(seq, length, model.test_recurrence, initial_state=torch.zeros(*seq.shape, model.hidden_size))
        assert torch.allclose(model.forward(seq, length, initial_state=torch.zeros(*seq.shape, model.hidden_size)), full[:, -1], atol=1e-5)


def test_rpt_reference_runs_its_pre_block_once_per_batch_with_unchanged_loss(lares, monkeypatch):
    import copy

    make, batch = lares
    model = make(rl_dropout_prob=0.0)
    reference = copy.deepcopy(model).eval()
    calls = []
    pre_block = reference.pre_block
    monkeypatch.setattr(reference, "pre_block", lambda seq: calls.append(1) or pre_block(seq))
    torch.manual_seed(11)
    shared_loss, shared_stats = model.reinforcement_post_training_loss(batch, reference)
    assert len(calls) == 1 < model.group_num
    # the previous way: the reference's pre-block re-run in every rollout
    reason = reference.reason
    monkeypatch.setattr(reference, "reason", lambda *args, pre=None, **kw: reason(*args, **kw))
    reference.train(False)  # a fresh eval noise stream, as the first call had
    torch.manual_seed(11)
    rerun_loss, rerun_stats = model.reinforcement_post_training_loss(batch, reference)
    assert len(calls) == 2 + model.group_num  # + its own shared call, now unused
    assert torch.allclose(shared_loss, rerun_loss, atol=1e-6) and shared_stats == pytest.approx(rerun_stats)


def test_fused_gelu_is_recboles_gelu(lares):
    from recbole.model.layers import FeedForward

    make, _ = lares
    model = make()
    x = torch.randn(1000) * 4
    recbole_gelu = FeedForward(4, 4, 0.0, "gelu", 1e-12).gelu
    assert torch.allclose(torch.nn.functional.gelu(x), recbole_gelu(x), atol=1e-6)
    acts = {layer.feed_forward.intermediate_act_fn for layer in [*model.pre_encoder.layer, *model.core_encoder.layer]}
    assert acts == {torch.nn.functional.gelu}


# =================================================================================================================
# Mixed precision: RecBole's own `enable_amp` key autocasts every training step (both stages of our trainers)
# =================================================================================================================
def _loss_in(model, batch, autocast):
    model.train(False)  # no dropout; LARES: fixed test depth and its eval noise, reset here for both runs
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        losses = model.calculate_loss(batch)
    return torch.stack([torch.as_tensor(loss, dtype=torch.float32) for loss in (losses if isinstance(losses, tuple) else (losses,))])


@pytest.mark.parametrize("name", ["REG4Rec", "R2ec", "LARES"])
def test_autocast_losses_match_full_precision_within_tolerance(name, request):
    if name == "REG4Rec":
        model, batch = request.getfixturevalue("reg4rec")
    elif name == "R2ec":
        model, batch, _ = request.getfixturevalue("r2ec")
    else:
        make, batch = request.getfixturevalue("lares")
        model = make(alpha=0.0)  # TLA needs the row-index column of a batch drawn after the model is built
    full, mixed = _loss_in(model, batch, False), _loss_in(model, batch, True)
    assert torch.isfinite(mixed).all() and not torch.equal(full, mixed)  # bf16 really ran
    assert torch.allclose(mixed, full, rtol=1e-2, atol=1e-2), (full, mixed)  # measured: <= 1e-3 relative
