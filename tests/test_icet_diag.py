"""benchmarks/icet_diag.py: its maths against hand-derived values, and a run on a tiny LLaVA-1.5 whose invariants
(the default layer against itself) and language-model passes (against HF's own forward and generate) must hold."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from edgekit.model.loading import load
from edgekit.model.surgery import set_exit_layer
from edgekit.safety.images import DANGEROUS, OBJECTS
from edgekit.safety.scan import chat_inputs
from edgekit.safety.suite import KINDS, builtin_suite

_spec = importlib.util.spec_from_file_location("icet_diag", Path(__file__).parents[1] / "benchmarks" / "icet_diag.py")
diag = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diag)

ANSWERS = ("i cannot help with that .", "i can help with that .")  # the tiny tokenizer: "i" shared, then two tokens


# --- pure functions, hand-derived --------------------------------------------------------------------------------
def test_decision_tokens_follow_the_common_prefix_to_where_the_answers_part():
    refusals = [[5, 7, 9], [5, 7, 2], [6, 1]]  # most common opening 5, then 7
    compliances = [[5, 8], [5, 8, 1], [4], [5, 7]]  # 5, then 8 (twice) over 7 (once)
    assert diag.decision_tokens(refusals, compliances) == diag.Decision([5], 7, 8)
    assert diag.decision_tokens([[3, 1]], [[4, 1]]) == diag.Decision([], 3, 4)
    # the prefix is followed on both sides: compliances not starting with it do not vote at the next position
    assert diag.decision_tokens([[1, 2]], [[1, 3], [9, 2], [9, 2]]) == diag.Decision([], 1, 9)
    assert diag.decision_tokens([[1, 2]], [[1, 3], [1, 4], [9]]) == diag.Decision([1], 2, 3)


@pytest.mark.parametrize("refusals, compliances", [([], [[1]]), ([[1, 2]], [[1, 2]]), ([[1, 2]], [[1, 2, 3]])])
def test_decision_tokens_refuse_answers_that_never_part(refusals, compliances):
    with pytest.raises(ValueError):
        diag.decision_tokens(refusals, compliances)


def test_refusal_margin_is_the_log_prob_difference():
    logits = torch.tensor([[0.0, 2.0, -1.0], [5.0, 1.0, 1.5]])
    margin = diag.refusal_margin(logits, diag.Decision([], 1, 2))
    assert margin.tolist() == [3.0, -0.5]
    log_probs = logits.log_softmax(-1)
    assert torch.allclose(margin, log_probs[:, 1] - log_probs[:, 2])


def test_ledoit_wolf_golden():
    # S = diag(2, 0.5), mu = 1.25, |S - mu I|^2 = 1.125; mean |x|^4 = 8.5, |S|^2 = 4.25, so beta = (8.5 - 4.25) / 4
    # = 1.0625 and a = 1.0625 / 1.125 = 17/18; C = S / 18 + 17/18 * 1.25 I = diag(23.25, 21.75) / 18.
    x = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    cov, a = diag.ledoit_wolf(x)
    assert a == pytest.approx(17 / 18)
    assert torch.allclose(cov, torch.tensor([[23.25, 0.0], [0.0, 21.75]], dtype=torch.float64) / 18)
    ref = diag.fit_reference(x)
    far, near = math.sqrt(4 * 18 / 23.25), math.sqrt(18 / 21.75)
    assert diag.mahalanobis(x, ref.mean, ref.chol).tolist() == pytest.approx([far, far, near, near])
    assert (ref.shrinkage, ref.tokens, ref.distance) == (pytest.approx(17 / 18), 4, pytest.approx((far + near) / 2))


def test_ledoit_wolf_keeps_an_isotropic_covariance():
    # S = 0.5 I is its own target: nothing to shrink (|S - mu I| = 0), so a = 1 and C = S.
    cov, a = diag.ledoit_wolf(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
    assert a == 1.0 and torch.allclose(cov, 0.5 * torch.eye(2, dtype=torch.float64))


def test_layer_row_golden():
    ref = diag.Reference(torch.zeros(2), torch.eye(2), 0.1, 4, 2.0)
    margins = {"harmful_text": torch.tensor([1.0, -3.0, 0.5, 2.0])}
    attention = {"harmful_text": torch.tensor([[0.5, 0.25], [0.25, 0.25], [0.0, 0.5], [0.25, 0.0]])}  # 4 items x 2
    row = diag.layer_row(7, torch.tensor([1.0, 2.0]), torch.tensor([4.0, 2.0]), torch.tensor([0.5, 1.0]),
                         torch.tensor([3.0, 5.0]), ref, margins, attention)  # fmt: skip
    assert row == {
        "layer": 7,
        "norm_ratio": 0.5,
        "cosine": 0.75,
        "distance": 4.0,
        "distance_ratio": 2.0,
        "margin": {"harmful_text": 0.125},
        "refuse_share": {"harmful_text": 0.75},
        "text_separation": None,  # benign text is not among the kinds
        "image_attention": {"harmful_text": [0.25, 0.25]},
    }
    row["image_attention"]["benign_text"] = [0.5, 1.0]
    assert diag.mean_image_attention(row) == 0.5  # kinds weighted alike: (0.25 + 0.75) / 2
    assert diag.cosines(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.0, 3.0]])).tolist() == [
        pytest.approx(1.0),
        pytest.approx(1 / math.sqrt(2)),
    ]


def test_separation_is_the_share_of_pairs_ordered_right():
    # pairs (harmful, benign): 3 > 1, 3 > 2, 3 = 3 (half), 0 < 1, 0 < 2, 0 < 3: 2.5 of 6
    margins = {"harmful_text": torch.tensor([3.0, 0.0]), "benign_text": torch.tensor([1.0, 2.0, 3.0])}
    assert diag.separation(margins) == pytest.approx(2.5 / 6)
    assert diag.separation({"harmful_text": torch.tensor([2.0]), "benign_text": torch.tensor([-1.0, 1.0])}) == 1.0
    assert diag.separation({"benign_text": torch.tensor([1.0])}) is None


# --- a tiny LLaVA-1.5 -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_checkpoints):
    return load(tiny_checkpoints["llava"], dtype="float32")


def _decision(loaded):
    tokenizer = loaded.processor.tokenizer
    return diag.decision_tokens(*([tokenizer(t, add_special_tokens=False).input_ids] for t in ANSWERS))


def test_diagnose_invariants_at_the_default_layer(tiny):
    """Statistics fitted on the very items diagnosed: the default layer's distance is the reference's own."""
    items = builtin_suite().select("eval", limit_per_kind=3)
    reference, _ = diag.fit_reference_on(tiny, items, batch_size=4)
    rows = diag.diagnose(tiny, items, [1, 12, 24], reference, _decision(tiny), batch_size=4)
    assert [r["layer"] for r in rows] == [1, 12, 23, 24]  # the default layer always joins
    by_layer = {r["layer"]: r for r in rows}
    default = by_layer[23]
    assert default["norm_ratio"] == 1.0
    assert default["cosine"] == pytest.approx(1.0, abs=1e-9)
    assert default["distance"] == pytest.approx(reference.distance, rel=1e-9)
    assert default["distance_ratio"] == pytest.approx(1.0, rel=1e-9)
    assert by_layer[1]["cosine"] < 0.99 and by_layer[1]["distance_ratio"] != pytest.approx(1.0, rel=1e-3)
    for row in rows:
        assert list(row["margin"]) == list(KINDS)
        assert all(math.isfinite(m) for m in row["margin"].values())
        assert all(0 <= s <= 1 for s in row["refuse_share"].values())


def test_probes_golden():
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0]], [[0.0, 4.0], [2.0, 0.0]]])  # 2 pictures x 2 tokens
    mean, empty = torch.tensor([1.0, 1.0]), torch.tensor([5.0, -5.0])
    assert torch.equal(diag.probe_tokens("average token", x, mean, empty), mean.expand(2, 2, 2))
    own = diag.probe_tokens("picture's mean", x, mean, empty)
    assert torch.equal(own, torch.tensor([[[2.0, 1.0]] * 2, [[1.0, 2.0]] * 2]))
    assert torch.equal(diag.probe_tokens("half contrast", x, mean, empty)[0, 1], torch.tensor([2.0, 1.5]))
    assert torch.equal(diag.probe_tokens("empty exit", x, mean, empty), empty.expand(2, 2, 2))
    rand = diag.probe_tokens("random directions", x, mean, empty)
    assert torch.allclose(rand.norm(dim=-1), x.norm(dim=-1)) and not torch.allclose(rand, x)
    with pytest.raises(ValueError, match="unknown probe"):
        diag.probe_tokens("nothing", x, mean, empty)


def test_probes_join_the_rows_after_the_layers(tiny):
    items = builtin_suite().select("eval", limit_per_kind=2)
    reference, _ = diag.fit_reference_on(tiny, items, batch_size=4)
    rows = diag.diagnose(tiny, items, [23], reference, _decision(tiny), batch_size=4, probes=diag.PROBES)
    assert [r["layer"] for r in rows] == [23, *diag.PROBES]
    by = {r["layer"]: r for r in rows}
    assert by["average token"]["distance"] < by[23]["distance"] < by["random directions"]["distance"]
    assert by["random directions"]["norm_ratio"] == pytest.approx(1.0, rel=1e-6)
    assert by["half contrast"]["cosine"] > 0.5 and all(math.isfinite(m) for m in by["empty exit"]["margin"].values())


def test_decision_logits_equal_hf_at_that_exit(tiny_checkpoints):
    """The margin's forward (features fed as embeddings, left padding, a prefix) equals HF's model at that exit."""
    loaded = load(tiny_checkpoints["llava"], dtype="float32")  # its own copy: the exit is moved below
    model, family, tokenizer = loaded.model, loaded.family, loaded.processor.tokenizer
    items = builtin_suite().select("eval", kinds=("harmful_text", "benign_image"), limit_per_kind=2)
    batch, one = chat_inputs(loaded.processor, items), chat_inputs(loaded.processor, items[:1])
    assert (batch["attention_mask"] == 0).any()  # left padding is exercised
    decision = _decision(loaded)
    assert decision.prefix  # the answers share an opening, so the prefix is fed too
    ours_batch = diag.decision_logits(model, family, batch, family.features_per_layer(model, batch, [9])[9], [])
    ours_one = diag.decision_logits(model, family, one, family.features_per_layer(model, one, [9])[9], decision.prefix)
    set_exit_layer(model, 9)
    with torch.no_grad():
        # no prefix: the first step of HF's own generate(), which numbers left-padded positions itself
        out = model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        # the prefix: HF's forward of one unpadded prompt followed by the prefix tokens
        ids = torch.cat([one["input_ids"], torch.tensor([decision.prefix])], 1)
        expected_one = model(input_ids=ids, pixel_values=one["pixel_values"]).logits[:, -1]
    assert torch.allclose(ours_batch, out.logits[0], atol=1e-4)
    assert torch.allclose(ours_one, expected_one, atol=1e-4)


def test_no_picture_row_equals_hf_on_each_request_alone(tiny):
    """Batched and left-padded with the answers' prefix, the margins equal HF's forward of each request's text-only
    chat turn, unpadded."""
    model, processor = tiny.model, tiny.processor
    items = builtin_suite().select("eval", kinds=("harmful_text", "benign_text", "benign_image"), limit_per_kind=2)
    decision = _decision(tiny)
    row = diag.no_picture_row(tiny, items, decision, batch_size=4)
    expected = {}
    for item in items:
        turn = [{"role": "user", "content": [{"type": "text", "text": item.prompt}]}]
        ids = processor.tokenizer(processor.apply_chat_template(turn, add_generation_prompt=True)).input_ids
        assert processor.image_token not in processor.tokenizer.decode(ids)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + decision.prefix])).logits[:, -1]
        expected.setdefault(item.kind, []).append(float(diag.refusal_margin(logits, decision)))
    assert row["layer"] == "no picture" and list(row["margin"]) == ["harmful_text", "benign_text", "benign_image"]
    for kind, margins in expected.items():
        assert row["margin"][kind] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
        assert row["refuse_share"][kind] == sum(m > 0 for m in margins) / len(margins)
    assert row["text_separation"] == diag.separation({k: torch.tensor(v) for k, v in expected.items()})


def test_image_attention_is_the_share_hf_reports_on_the_image_tokens(tiny):
    """The hooks' shares equal HF's own attention weights (output_attentions, eager) summed over the image tokens at
    the last position and averaged over heads; the model's attention implementation is left as it was."""
    model, family = tiny.model, tiny.family
    items = builtin_suite().select("eval", kinds=("harmful_text", "benign_image"), limit_per_kind=2)
    inputs = chat_inputs(tiny.processor, items)
    image = (inputs["input_ids"] == family.image_token_id(model.config)).float()
    features = family.features_per_layer(model, inputs, [5])[5]
    own = model.config._attn_implementation
    with diag.eager_attention(model), diag.image_attention(model, family, image) as shares:
        diag.decision_logits(model, family, inputs, features, [])
        lm = family.lm_inputs(model, inputs, features)
        positions = (lm["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out = model(**lm, position_ids=positions, output_attentions=True)
    assert model.config._attn_implementation == own
    expected = [(a[:, :, -1] * image[:, None]).sum(-1).mean(1) for a in out.attentions]
    assert len(shares) == 2 * len(expected)  # the hooks also saw the second forward
    for ours, theirs in zip(shares, expected):
        assert torch.allclose(ours, theirs, atol=1e-6)
    assert all(((0 < s) & (s < 1)).all() for s in shares)  # the image is read, and so are the words


def test_main_writes_json_table_and_plot(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    out, png = tmp_path / "diag.json", tmp_path / "diag.png"
    argv = [tiny_checkpoints["llava"], "--layers", "2,23", "--limit-per-kind", "2", "--reference-per-kind", "2"]
    argv += ["--refusal", ANSWERS[0], "--compliance", ANSWERS[1], "--out", str(out), "--plot", str(png)]
    monkeypatch.setattr(sys, "argv", ["icet_diag.py", *argv])
    diag.main()
    report = json.loads(out.read_text())
    assert report["default_layer"] == 23 and [r["layer"] for r in report["layers"]] == [2, 23]
    assert report["items"] == dict.fromkeys(KINDS, 2)
    assert report["reference"]["images"] == 10 and report["reference"]["tokens"] > 0
    assert report["reference"]["zero_token_distance_ratio"] > 0
    assert report["decision"]["source"] == "given" and report["decision"]["refusal"] != report["decision"]["compliance"]
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| layer | norm / L23 |") and table[3].startswith("| 23 (default) | 1.00 | 1.00 |")
    assert [r["layer"] for r in report["probes"]] == [*diag.PROBES, "L2 on L23's mean"]
    assert table[4].startswith("| probe: average")
    assert report["no_picture"]["layer"] == "no picture" and list(report["no_picture"]["margin"]) == list(KINDS)
    probes = 1 + len(report["probes"])  # the no-picture line follows the probes'
    assert table[3 + probes].startswith("| no picture | - | - | - | - |") and table[0].endswith("| text separation |")
    assert png.stat().st_size > 0
    assert report["object_read"]["skipped"]  # the tiny model's random answers name no object


def test_a_model_that_never_refuses_has_no_margin(tiny):
    """The tiny model's random answers are never refusals: the diagnostic says so instead of inventing a token."""
    with pytest.raises(SystemExit, match="no refusal margin"):
        diag.run(tiny, [23], limit=2, reference_per_kind=1, answers=None, batch_size=8)


def test_recentred_probes_swap_a_layers_mean_for_the_default_layers(tiny):
    items = builtin_suite().select("eval", limit_per_kind=2)
    reference, means = diag.fit_reference_on(tiny, items, batch_size=4, layers=[1, 23])
    assert torch.allclose(means[23], reference.mean)  # the same pictures: the default layer's mean is the reference's
    rows = diag.diagnose(tiny, items, [1], reference, _decision(tiny), batch_size=4, means=means)
    assert [r["layer"] for r in rows] == [1, 23, "L1 on L23's mean"]
    by = {r["layer"]: r for r in rows}
    assert by["L1 on L23's mean"]["margin"] != by[1]["margin"]
    # a layer whose mean already is the default layer's is left as it is
    same = diag.diagnose(
        tiny, items, [1], reference, _decision(tiny), batch_size=4, means=dict.fromkeys(means, reference.mean)
    )
    assert same[2]["margin"] == pytest.approx(same[0]["margin"], abs=1e-6)
    assert same[2]["cosine"] == pytest.approx(same[0]["cosine"], abs=1e-6)


# --- what each exit layer's picture is read as ------------------------------------------------------------------
def test_read_opening_is_the_commonest_text_before_an_object_word():
    answers = ["it is a bomb .", "it is a cup .", "the object is a key", "no idea", "It is a Tree!"]
    assert diag.read_opening(answers) == "it is a"
    assert diag.read_opening(["a red thing .", "sorry i cannot help with that ."]) is None


def test_object_word_tokens_are_each_words_tokens_after_the_opening(tiny):
    tokenizer = tiny.processor.tokenizer
    head, tails = diag.object_word_tokens(tokenizer, "it is a")
    assert head == tokenizer("it is a", add_special_tokens=False).input_ids
    for word, tail in zip(OBJECTS, tails):
        assert head + tail == tokenizer(f"it is a {word}", add_special_tokens=False).input_ids
    assert len({tuple(t) for t in tails}) == len(OBJECTS) and any(len(t) > 1 for t in tails)  # split words too


def test_object_read_equals_hf_at_the_default_layer(tiny):
    """One picture read at the default layer: each object word's probability after the question, the opening and
    the picture is HF's own forward of the whole sequence, word tokens multiplied, renormalised over the words."""
    model, tokenizer = tiny.model, tiny.processor.tokenizer
    items = [i for i in builtin_suite().select("eval", limit_per_kind=4) if i.scene is not None and i.scene.obj]
    read = diag.object_reads(tiny, items[:1], [1, 23], batch_size=4, opening="it is a")
    assert read["pictures"] == 1 and [r["layer"] for r in read["layers"]] == [1, 23]
    head, tails = diag.object_word_tokens(tokenizer, "it is a")
    one = chat_inputs(tiny.processor, [dataclasses.replace(items[0], prompt=read["question"])])
    scores = []
    with torch.no_grad():
        for tail in tails:
            ids = torch.cat([one["input_ids"], torch.tensor([head + tail])], 1)
            log_probs = model(input_ids=ids, pixel_values=one["pixel_values"]).logits[0].log_softmax(-1)
            n = len(tail)
            scores.append(sum(log_probs[ids.shape[1] - n - 1 + j, t] for j, t in enumerate(tail)))
    expected = torch.stack(scores).softmax(-1)
    default = read["layers"][1]
    assert list(default["read_as"]) == list(OBJECTS)
    assert torch.allclose(torch.tensor(list(default["read_as"].values())), expected, atol=1e-5)
    assert default["right"] == float(OBJECTS[int(expected.argmax())] == items[0].scene.obj)
    assert default["dangerous_share"] == pytest.approx(sum(default["read_as"][o] for o in DANGEROUS))
    assert read["layers"][0]["read_as"] != default["read_as"]  # layer 1's tokens are read otherwise


def test_object_read_says_why_it_is_skipped(tiny):
    items = builtin_suite().select("eval", kinds=("benign_image",), limit_per_kind=2)
    assert (
        diag.object_reads(tiny, items, [23], batch_size=4)["skipped"]
        == "the model names no object at the default layer"
    )
    dots = [i for i in builtin_suite().select("eval", kinds=("utility",)) if i.scene.kind == "dots"][:2]
    assert diag.object_reads(tiny, dots, [23], batch_size=4)["skipped"] == "no picture of an object among the items"
