"""A concept-gated adapter at evaluation time, against planted truth on tiny random models: a gate of
1 is the plain adapter and 0 the base model; in a batch of mixed gates each row measures what it
measures alone (logit score, activations, KL to base, greedy generation with dropped rows and the
prefix cache); a path without the rows' gates fails; and a gated run's trajectory snapshot is
evaluated through Study with its gate on."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_tiny_loaded

from evals.evaluate import evaluate_prompts
from evals.refusal import last_token_logprobs
from evals.utility import kl_to_base
from interp.activations import collect_activations
from interp.chat import format_prompts, iter_batches
from interp.direction import Direction
from interp.gating import UngatedForwardError, gate_rows, row_gated_adapter, select_gate_rows
from interp.generate import generate
from interp.loading import adapter_disabled, position_ids_from_mask
from study import Study, StudyConfig
from study.core import adapter_id_of
from study.trajectory import trajectory
from training.config import UnlearnConfig
from training.containment import (
    ConceptGate,
    Containment,
    adapter_gate,
    calibrate_gate,
    gated,
    gated_adapter,
    last_prompt_index,
)
from training.data import DataSet, Example, collate
from training.lora import attach_lora, detach_lora, load_adapter, merged_adapter
from training.trainer import UnlearnData, snapshots, unlearn

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET = [f"How do I break into system {i}?" for i in range(4)]
UNTOUCHED = [f"What is the home address of person {i} on Main Street?" for i in range(4)]
PROMPTS = [TARGET[0], UNTOUCHED[0], TARGET[1], UNTOUCHED[1], UNTOUCHED[2], TARGET[2]]  # mixed, several lengths
LAYER = 1


def concept(lm) -> Direction:
    a = collect_activations(lm, TARGET, [LAYER])[:, 0]
    b = collect_activations(lm, UNTOUCHED, [LAYER])[:, 0]
    return Direction.from_vectors(a.mean(0) - b.mean(0), [LAYER], name="cyber-minus-privacy")


def calibrated(lm, d: Direction) -> ConceptGate:
    probe = ConceptGate.from_direction(d, None, 0.0, 1.0, lm.model)

    def scores(prompts):
        b = next(iter(iter_batches(lm.tokenizer, format_prompts(lm.tokenizer, prompts), len(prompts))))
        return probe.scores(lm, b.input_ids, b.attention_mask, torch.full((len(prompts),), b.input_ids.shape[1] - 1))

    return ConceptGate.from_direction(d, None, *calibrate_gate(scores(TARGET), scores(UNTOUCHED)), lm.model)


def adapted(family: str):
    """A tiny model with a strong random LoRA adapter and a gate that separates the two prompt sets."""
    lm = make_tiny_loaded(family)
    gate = calibrated(lm, concept(lm))
    attach_lora(lm, rank=4)
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return lm, gate


def forced(gate: ConceptGate, value: float) -> ConceptGate:
    """The same gate pinned to ``value`` (0 or 1) on every prompt: sigmoid saturates exactly."""
    return dataclasses.replace(gate, bias=-1e9 if value else 1e9, temperature=1.0)


def full_logits(lm, prompts):
    b = next(iter(iter_batches(lm.tokenizer, format_prompts(lm.tokenizer, prompts), len(prompts))))
    with torch.no_grad(), gate_rows(lm, b.input_ids, b.attention_mask):
        out = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                       position_ids=position_ids_from_mask(b.attention_mask)).logits
    return out[b.attention_mask.bool()]  # real tokens only


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma3_text"])
def test_a_gate_of_one_is_the_plain_adapter_and_zero_the_base_model(family):
    lm, gate = adapted(family)
    plain_logits, plain_score = full_logits(lm, PROMPTS), last_token_logprobs(lm, PROMPTS, batch_size=3)
    with adapter_disabled(lm):
        base_logits, base_score = full_logits(lm, PROMPTS), last_token_logprobs(lm, PROMPTS, batch_size=3)
    assert (plain_logits - base_logits).abs().max() > 1e-2  # the adapter does something to gate
    for value, logits, score in ((1.0, plain_logits, plain_score), (0.0, base_logits, base_score)):
        with gated_adapter(lm, forced(gate, value)):
            torch.testing.assert_close(full_logits(lm, PROMPTS), logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(last_token_logprobs(lm, PROMPTS, batch_size=3), score, atol=1e-5, rtol=0)
    torch.testing.assert_close(full_logits(lm, PROMPTS), plain_logits)  # hooks gone on exit


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_in_a_mixed_batch_each_row_measures_what_it_measures_alone(family):
    lm, gate = adapted(family)
    with gated_adapter(lm, gate):
        b = next(iter(iter_batches(lm.tokenizer, format_prompts(lm.tokenizer, PROMPTS), len(PROMPTS))))
        with gate_rows(lm, b.input_ids, b.attention_mask) as g:
            g = g[torch.argsort(torch.as_tensor(b.index))]
        assert (g[[0, 2, 5]] > 0.5).all() and (g[[1, 3, 4]] < 0.5).all()  # planted: targets open, rest shut
        score = last_token_logprobs(lm, PROMPTS, batch_size=len(PROMPTS), prefix_cache=True)
        acts = collect_activations(lm, PROMPTS, [1, 3], batch_size=len(PROMPTS))
        kl = kl_to_base(lm, PROMPTS, n_tokens=3, batch_size=len(PROMPTS))
        for i, p in enumerate(PROMPTS):
            torch.testing.assert_close(last_token_logprobs(lm, [p], batch_size=1)[0], score[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(collect_activations(lm, [p], [1, 3])[0], acts[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(kl_to_base(lm, [p], n_tokens=3)[0], kl[i], atol=1e-6, rtol=1e-4)
    plain = last_token_logprobs(lm, PROMPTS, batch_size=len(PROMPTS))
    assert (plain - score).abs().amax(-1)[[1, 3, 4]].min() > 1e-3  # the shut rows are not the plain adapter
    assert kl_to_base(lm, PROMPTS, n_tokens=3)[[1, 3, 4]].mean() > kl[[1, 3, 4]].mean()


def test_a_prompt_is_gated_as_the_training_step_gates_it(tiny_qwen):
    """The evaluation gate of a prompt equals the training gate of the same prompt with a response."""
    lm, gate = tiny_qwen, calibrated(tiny_qwen, concept(tiny_qwen))
    examples = [Example(f"e{i}", "x", p, "Sure, here is a longer answer.", "compliance") for i, p in enumerate(PROMPTS)]
    tb = collate(lm.tokenizer, examples)
    attach_lora(lm, rank=4)
    with gated(lm, gate, tb.input_ids, tb.attention_mask, last_prompt_index(tb.response_mask)) as train_g:
        pass
    with gated_adapter(lm, gate):
        b = next(iter(iter_batches(lm.tokenizer, format_prompts(lm.tokenizer, PROMPTS), len(PROMPTS))))
        with gate_rows(lm, b.input_ids, b.attention_mask) as eval_g:
            pass
    torch.testing.assert_close(eval_g[torch.argsort(torch.as_tensor(b.index))], train_g, atol=1e-6, rtol=0)


@pytest.mark.parametrize("engine", ["emalab", "hf"])
def test_greedy_generation_of_a_mixed_batch_equals_per_row_generation(engine):
    lm, gate = adapted("qwen2")

    def stop(text: str) -> bool:  # ends rows at different steps, so finished rows leave the batch
        return bool(text) and len(text) >= 3 + ord(text[0]) % 5

    kw = dict(max_new_tokens=10, progress=False, stop=stop, prefix_cache=True, engine=engine)
    plain = generate(lm, PROMPTS, batch_size=len(PROMPTS), **kw)
    with gated_adapter(lm, gate):
        first: dict = {}
        batched = generate(lm, PROMPTS, batch_size=len(PROMPTS), first_logprobs=first, **kw)
        alone = [generate(lm, [p], batch_size=1, **kw)[0] for p in PROMPTS]
        score = last_token_logprobs(lm, PROMPTS, batch_size=2)
    assert batched == alone
    assert len({len(t) for t in batched}) > 1  # rows did stop at different steps
    assert batched != plain  # the gate changed some answers
    torch.testing.assert_close(first["logprobs"], score, atol=1e-5, rtol=0)  # the prefill is gated too


def test_a_path_without_the_rows_gates_fails_loudly(tiny_qwen):
    lm = tiny_qwen
    b = next(iter(iter_batches(lm.tokenizer, format_prompts(lm.tokenizer, PROMPTS[:2]), 2)))
    with pytest.raises(ValueError, match="no LoRA"), row_gated_adapter(lm, lambda i, m: torch.ones(len(i))):
        pass
    attach_lora(lm, rank=4)
    with row_gated_adapter(lm, lambda ids, mask: torch.ones(len(ids))):
        with pytest.raises(UngatedForwardError, match="outside interp.gating.gate_rows"):
            lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask)
        with gate_rows(lm, b.input_ids, b.attention_mask), pytest.raises(UngatedForwardError, match="select_gate"):
            lm.model(input_ids=b.input_ids[:1], attention_mask=b.attention_mask[:1])
        with gate_rows(lm, b.input_ids, b.attention_mask):
            select_gate_rows(lm, torch.tensor([1]))
            lm.model(input_ids=b.input_ids[1:], attention_mask=b.attention_mask[1:])  # the kept row runs
        with pytest.raises(RuntimeError, match="already active"), row_gated_adapter(lm, lambda i, m: i):
            pass
    with merged_adapter(lm), pytest.raises(ValueError, match="merged"), row_gated_adapter(lm, lambda i, m: i):
        pass


# -- a gated run through the Study -----------------------------------------------------------------


@pytest.fixture
def gated_run(tmp_path):
    lm = make_tiny_loaded("qwen2")
    forget = DataSet([Example(f"f{i}", "cybersecurity", p, f"I'm sorry, I can't help with system {i}.", "refusal")
                      for i, p in enumerate(TARGET)])
    retain = DataSet([Example(f"r{i}", "privacy", p, "I cannot share personal information.", "refusal")
                      for i, p in enumerate(UNTOUCHED)])
    cfg = UnlearnConfig(model=lm.name, dtype="float32", n_forget=4, batch_size=2, retain_batch_size=2, steps=4,
                        snapshot_every=2, checkpoint_every=0, lr=3e-2, lora_rank=4, lora_alpha=8.0, concept_gate=True)
    run = tmp_path / "run"
    unlearn(lm, cfg, run, progress=False, data=UnlearnData(forget, retain),
            containment=Containment(gate_vector=concept(lm)))
    detach_lora(lm)
    study = Study(StudyConfig(model=lm.name, dtype="float32", results=str(tmp_path / "results"), eval_limit=4,
                              probe_limit=4, steps=2, trajectory_steps=4, trajectory_every=2), _lm=lm)
    return study, run


def test_a_gated_runs_snapshots_are_evaluated_through_study_with_their_gate(gated_run):
    study, run = gated_run
    lm = study.lm
    snaps = snapshots(run)
    assert sorted(snaps) == [2, 4]
    gate = adapter_gate(snaps[4])
    assert gate is not None and gate.layer == LAYER and gate.describe() == adapter_gate(run / "adapter").describe()
    assert "+gate-" in adapter_id_of(snaps[4])
    sets = {"cybersecurity": [(f"c{i}", p) for i, p in enumerate(TARGET)],
            "privacy": [(f"p{i}", p) for i, p in enumerate(UNTOUCHED)],
            "benign": [(f"b{i}", f"What is {i} plus {i}?") for i in range(3)]}
    t = trajectory(study, run, sets, "gated")
    assert t.steps == [0, 2, 4]

    ecfg = dataclasses.replace(study.eval_config(), generate=False)
    load_adapter(lm, snaps[4])
    try:
        with pytest.raises(ValueError, match="concept-gated"), merged_adapter(lm):
            pass
        ungated = evaluate_prompts(lm, sets, ecfg, progress=False)  # unmerged, no gate: the plain adapter
        with gated_adapter(lm, gate):
            by_hand = evaluate_prompts(lm, sets, ecfg, progress=False)
    finally:
        detach_lora(lm)

    def p_refuse(report, name):
        return torch.tensor([torch.sigmoid(torch.tensor(r.logit_score)).item()
                             for r in report.records if r.domain == name], dtype=torch.float64)

    for name in ("cybersecurity", "privacy"):
        torch.testing.assert_close(torch.as_tensor(t.p[name][-1]), p_refuse(by_hand, name), atol=1e-5, rtol=0)
    assert (torch.as_tensor(t.p["privacy"][-1]) - p_refuse(ungated, "privacy")).abs().max() > 1e-4
    assert t.kl[-1] == pytest.approx(by_hand.utility["kl_to_base"], rel=1e-4)
    assert t.kl[-1] < ungated.utility["kl_to_base"]  # the gate shuts the adapter on the benign prompts


def test_the_gate_report_and_concept_file_of_a_gated_run_are_cached_stages(gated_run):
    from evals.suite import DOMAINS, load_prompts
    from study.gate import gate_report
    from training.containment import gate_accuracy

    study, run = gated_run
    report = gate_report(study, run, "cybersecurity")
    on = [p.text for p in load_prompts("cybersecurity", "eval", limit=4)]
    off = [p.text for d in DOMAINS if d != "cybersecurity" for p in load_prompts(d, "eval", limit=4)]
    direct = gate_accuracy(study.lm, adapter_gate(run / "adapter"), on, off)
    assert report["n_target"] == 4 and report["n_untouched"] == 4 * (len(DOMAINS) - 1)
    assert report["accuracy"] == direct.accuracy and report["target_mean"] == pytest.approx(direct.target_mean)
    assert gate_report(study, run, "cybersecurity") == report
    assert len(list((study.results / "stages" / "gate_accuracy").glob("*/DONE.json"))) == 1
    with pytest.raises(ValueError, match="not a concept-gated run"):
        (run / "plain" / "adapter").mkdir(parents=True)
        gate_report(study, run / "plain", "cybersecurity")
    path = study.concept_file("cybersecurity", "rest")
    d = Direction.load(path, study.lm.model)
    assert d.layers == [0, 1, 2, 3] and path == study.concept_file("cybersecurity", "rest")
    torch.testing.assert_close(d.vectors, study.concepts(contrast="rest").direction("cybersecurity").vectors)


def test_a_gate_missing_or_altered_beside_its_adapter_is_refused(tmp_path):
    from training.containment import gate_files
    from training.lora import ADAPTER_META, save_adapter

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / ADAPTER_META).write_text('{"config": {"concept_gate": true}}')
    with pytest.raises(ValueError, match="not saved with it"):
        adapter_gate(tmp_path / "old")
    lm = make_tiny_loaded("qwen2")
    attach_lora(lm, rank=2)
    gate = ConceptGate(torch.nn.functional.normalize(torch.randn(64), dim=0), 1, 0.5, 2.0)
    meta, tensors = gate_files(gate)
    save_adapter(lm, tmp_path / "new", meta, tensors)
    assert adapter_gate(tmp_path / "new").describe() == gate.describe()
    save_adapter(lm, tmp_path / "plain")
    assert adapter_gate(tmp_path / "plain") is None
    from interp.io import atomic_save_safetensors

    atomic_save_safetensors(tmp_path / "new" / "gate.safetensors", {"vector": -gate.vector})
    with pytest.raises(ValueError, match="does not match"):
        adapter_gate(tmp_path / "new")
