"""Analysis built on the hook points (issue 35): the logit lens, direct logit attribution, activation
patching, head ablation, head scores and attention patterns (``gpt2.interpretability.analysis``),
held to the real ``transformer-lens`` computing the same on the same checkpoint, to known answers, and
driven through ``gpt2 inspect``; bad inputs are one line each."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import BYTES, assert_one_line_error, random_model, run_cli, saved_model_dir, trained_model
from test_interpretability import TOLERANCE, ids_of, lens, one_line_error, relative_difference

from gpt2 import GPT2
from gpt2.interpretability.analysis import (
    ablate_heads,
    attention_patterns,
    direct_logit_attribution,
    head_scores,
    logit_difference,
    logit_lens,
    patch_heads,
    patch_residual,
    repeated_tokens,
)

TEXT = "the cat sat on the mat. the dog sat on the log. "


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer model of width 64 (4 heads) trained on TEXT until it predicts it from context (after
    "the cat sat on the ", "m"; after the dog's, "l"), saved."""
    return saved_model_dir(trained_model(TEXT, steps=300, lr=1e-2, n_embd=64), tmp_path_factory)


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> GPT2:
    return GPT2.from_pretrained(checkpoint)


FLAGS = dict.fromkeys(("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases"), True)
CLEAN, CORRUPTED = "the cat sat on the ", "the dog sat on the "  # next: 'm' (mat), 'l' (log)
PROMPT = "the cat sat on the mat. the dog"


@pytest.fixture(scope="module")
def plain_lens(checkpoint: Path) -> object:
    """TransformerLens's model of the checkpoint, its weights as they are."""
    return lens(checkpoint)


@pytest.fixture(scope="module")
def processed_lens(checkpoint: Path) -> object:
    """TransformerLens's model of the checkpoint processed as its from_pretrained does by default."""
    return lens(checkpoint, **FLAGS)


def their_logit_lens(theirs: object, ids: torch.Tensor) -> torch.Tensor:
    """TransformerLens's logit lens: the accumulated residual stream with the final LayerNorm applied
    (recomputed per layer), times W_U plus b_U, as log-probabilities (layers + 1, T, vocab)."""
    _, cache = theirs.run_with_cache(ids)
    stack = cache.accumulated_resid(apply_ln=True)[:, 0]
    return (stack @ theirs.W_U + theirs.b_U).log_softmax(-1)


def their_attribution(theirs: object, ids: torch.Tensor, direction: torch.Tensor, position: int) -> tuple:
    """TransformerLens's direct logit attribution at ``position``: the per-head results and the MLP
    outputs through ``apply_ln_to_stack`` (the cached final scale), times ``direction`` (d_model)."""
    _, cache = theirs.run_with_cache(ids)
    heads = cache.stack_head_results(layer=-1, pos_slice=position)  # (layers * heads, 1, d_model)
    mlps = torch.stack([cache["mlp_out", layer][:, position] for layer in range(theirs.cfg.n_layers)])
    heads = cache.apply_ln_to_stack(heads, layer=-1, pos_slice=position) @ direction
    mlps = cache.apply_ln_to_stack(mlps, layer=-1, pos_slice=position) @ direction
    return heads.view(theirs.cfg.n_layers, theirs.cfg.n_heads), mlps[:, 0]


# ----------------------------------------------------------------------------------------------------
# Against TransformerLens


def test_the_logit_lens_equals_transformer_lens(model: GPT2, plain_lens: object,
                                                processed_lens: object) -> None:
    for text in (PROMPT, "a mat"):
        ids = ids_of(text)
        mine = logit_lens(model, ids)
        assert mine.shape == (3, ids.shape[1], 257)
        worst = relative_difference(mine, their_logit_lens(plain_lens, ids))
        worst_processed = relative_difference(logit_lens(model.processed(), ids),
                                              their_logit_lens(processed_lens, ids))
        print(f"logit lens of {ids.shape[1]} tokens: {worst:.1e} plain, {worst_processed:.1e} processed")
        assert worst < TOLERANCE and worst_processed < TOLERANCE
        # The last layer's lens is the model's own prediction.
        assert relative_difference(mine[-1], model(ids)[0].log_softmax(-1)) < TOLERANCE


@pytest.mark.parametrize("position", [-1, 9])
def test_direct_logit_attribution_equals_transformer_lens(model: GPT2, plain_lens: object,
                                                          processed_lens: object, position: int) -> None:
    ids, token, wrong = ids_of(PROMPT), BYTES.encode(" ")[0], BYTES.encode("s")[0]
    # Processed (TransformerLens's default): apply_ln_to_stack times W_U, as its tutorials compute it.
    processed = model.processed()
    for other in (None, wrong):
        mine = direct_logit_attribution(processed, ids, token, position, wrong=other)
        direction = processed_lens.W_U[:, token] - (0 if other is None else processed_lens.W_U[:, other])
        heads, mlps = their_attribution(processed_lens, ids, direction, position)
        worst = max(relative_difference(mine.heads, heads), relative_difference(mine.mlps, mlps))
        print(f"attribution, processed, wrong={other}: {worst:.1e}")
        assert worst < TOLERANCE
    # Plain weights: the final LayerNorm's weight multiplies the unembedding (what fold_ln does).
    mine = direct_logit_attribution(model, ids, token, position, wrong=wrong)
    direction = plain_lens.ln_final.w * (plain_lens.W_U[:, token] - plain_lens.W_U[:, wrong])
    heads, mlps = their_attribution(plain_lens, ids, direction, position)
    worst = max(relative_difference(mine.heads, heads), relative_difference(mine.mlps, mlps))
    print(f"attribution, plain: {worst:.1e}")
    assert worst < TOLERANCE
    # The parts add up to the logit difference the model computes.
    with torch.no_grad():
        logits = model(ids)[0, position]
    for parts in (mine, direct_logit_attribution(processed, ids, token, position)):
        total = parts.heads.sum() + parts.mlps.sum() + parts.embed + parts.pos_embed + parts.biases
        assert abs(float(total) - parts.logit) < 1e-4 * max(abs(parts.logit), 1.0)
    assert abs(mine.logit - float(logits[token] - logits[wrong])) < 1e-4
    # Token ids and positions may be NumPy or 0-d tensor integers.
    same = direct_logit_attribution(model, ids, torch.tensor(token), torch.tensor(position), wrong=wrong)
    assert torch.equal(same.heads, mine.heads)


def their_patching(theirs: object, name_of: object, index_of: object,
                   cells: list[tuple[int, int]]) -> list[float]:
    """TransformerLens by hand, as its tutorials patch: the corrupted run with the clean run's activation
    at ``name_of(layer)``, ``index_of(cell)``, logit difference normalized between the two runs."""
    clean, corrupted = ids_of(CLEAN), ids_of(CORRUPTED)
    answer, wrong = BYTES.encode("m")[0], BYTES.encode("l")[0]

    def metric(logits: torch.Tensor) -> float:
        return (logits[0, -1, answer] - logits[0, -1, wrong]).item()

    _, clean_cache = theirs.run_with_cache(clean)
    low, high = metric(theirs(corrupted)), metric(theirs(clean))
    values = []
    for layer, where in cells:
        def patch(activation: torch.Tensor, hook: object, where: int = where) -> torch.Tensor:
            index = index_of(where)
            activation[index] = clean_cache[hook.name][index]
            return activation

        values.append((metric(theirs.run_with_hooks(corrupted, fwd_hooks=[(name_of(layer), patch)])) - low)
                      / (high - low))
    return values


def test_patching_equals_transformer_lens_by_hand(model: GPT2, plain_lens: object) -> None:
    metric = logit_difference(BYTES.encode("m")[0], BYTES.encode("l")[0])
    residual = patch_residual(model, ids_of(CLEAN), ids_of(CORRUPTED), metric)
    T = len(CLEAN)
    assert residual.shape == (2, T)
    cells = [(layer, position) for layer in range(2) for position in range(T)]
    theirs = their_patching(plain_lens, lambda layer: f"blocks.{layer}.hook_resid_pre",
                            lambda position: (slice(None), position), cells)
    worst = (residual.flatten() - torch.tensor(theirs)).abs().max().item()
    heads = patch_heads(model, ids_of(CLEAN), ids_of(CORRUPTED), metric)
    cells = [(layer, head) for layer in range(2) for head in range(4)]
    theirs_heads = their_patching(plain_lens, lambda layer: f"blocks.{layer}.attn.hook_z",
                                  lambda head: (slice(None), slice(None), head), cells)
    worst_heads = (heads.flatten() - torch.tensor(theirs_heads)).abs().max().item()
    print(f"patching: residual {worst:.1e}, heads {worst_heads:.1e} (shares of the logit difference)")
    assert worst < 1e-4 and worst_heads < 1e-4
    # Nothing before the first token that differs ('c'/'d', position 4); entering layer 0 (the
    # embeddings), nothing where the tokens are the same; some head carries much of it.
    assert residual[:, :4].abs().max() < 1e-4 and residual[0, 7:].abs().max() < 1e-4
    assert heads.max() > 0.5
    unnormalized = patch_residual(model, ids_of(CLEAN), ids_of(CORRUPTED), metric, normalize=False)
    low, high = (metric(model(ids_of(text))).item() for text in (CORRUPTED, CLEAN))
    assert high - low > 1  # the model tells the cat from the dog
    assert torch.allclose(unnormalized, residual * (high - low) + low, atol=1e-4)


def test_head_scores_are_transformer_lens_detection_patterns_per_query(model: GPT2,
                                                                        plain_lens: object) -> None:
    from transformer_lens import head_detector

    ids = ids_of(PROMPT)
    T = ids.shape[1]
    scores = head_scores(model, ids)
    _, cache = plain_lens.run_with_cache(ids)
    for name, mine in [("previous_token", scores.previous_token), ("duplicate_token", scores.duplicate_token),
                       ("induction", scores.induction)]:
        detection = getattr(head_detector, f"get_{name}_head_detection_pattern")(ids)
        queries = int(detection.any(-1).sum())  # TransformerLens divides by all T queries, we by these
        for layer in range(2):
            for head in range(4):
                theirs = head_detector.compute_head_attention_similarity_score(
                    cache["pattern", layer][0, head], detection, exclude_bos=False,
                    exclude_current_token=False, error_measure="mul")
                assert abs(mine[layer, head].item() - theirs * T / queries) < 1e-5, (name, layer, head)


def test_head_scores_of_forced_patterns_are_one() -> None:
    """Layer 0's heads forced (hook_pattern replaced) to attend to the previous token, the earlier
    occurrence of their token, and the token after it: each scores 1 on its own measure."""
    model = random_model(n_layer=2, n_head=4, n_embd=32, tokenizer=BYTES).eval()
    ids = repeated_tokens(12, 257, bos=256, seed=3)
    assert ids.shape == (1, 25) and torch.equal(ids[0, 1:13], ids[0, 13:]) and ids[0, 0] == 256
    assert len(set(ids[0, 1:13].tolist())) == 12
    T, half = 25, 12

    def force(pattern: torch.Tensor, hook: object) -> torch.Tensor:
        pattern = torch.zeros_like(pattern)
        queries = torch.arange(T)
        pattern[:, 0, queries, (queries - 1).clamp(min=0)] = 1.0  # previous token (the first: itself)
        earlier = torch.where(queries > half, queries - half, queries)  # second copy: its first occurrence
        pattern[:, 1, queries, earlier] = 1.0
        pattern[:, 2, queries, torch.where(queries > half, queries - half + 1, queries)] = 1.0  # the next one
        pattern[:, 3] = torch.ones(T, T).tril() / torch.arange(1, T + 1)[:, None]  # uniform
        return pattern

    scores = head_scores(model, ids, fwd_hooks=[("blocks.0.attn.hook_pattern", force)])
    assert scores.previous_token[0, 0] == pytest.approx(1.0)
    assert scores.duplicate_token[0, 1] == pytest.approx(1.0)
    assert scores.induction[0, 2] == pytest.approx(1.0)
    for measure, head in ((scores.previous_token, 0), (scores.duplicate_token, 1), (scores.induction, 2)):
        others = [measure[0, h].item() for h in range(4) if h != head]
        assert max(others) < 0.2, others
    uniform = sum(1 / (query + 1) for query in range(half + 1, T)) / half  # 1 / (q + 1) on each key
    assert scores.induction[0, 3] == pytest.approx(uniform)
    assert scores.duplicate_token[0, 3] == pytest.approx(uniform)
    # No repeated token: no duplicate-token or induction scores.
    plain = head_scores(model, ids_of("abcdef"))
    assert plain.duplicate_token.isnan().all() and plain.induction.isnan().all()
    assert not plain.previous_token.isnan().any()


def test_head_ablation_equals_transformer_lens_hooks(model: GPT2, plain_lens: object) -> None:
    ids = ids_of(PROMPT)
    heads = [(0, 1), (1, 3), (1, 0)]

    def zero(z: torch.Tensor, hook: object) -> torch.Tensor:
        for layer, head in heads:
            if hook.layer() == layer:
                z[:, :, head] = 0.0
        return z

    ablated = ablate_heads(model, ids, heads)
    theirs = plain_lens.run_with_hooks(ids, fwd_hooks=[(lambda name: name.endswith("hook_z"), zero)])
    assert relative_difference(ablated.logits, theirs) < TOLERANCE
    assert ablated.loss == pytest.approx(F.cross_entropy(theirs[0, :-1], ids[0, 1:]).item(), rel=1e-5)
    plain = ablate_heads(model, ids, [])
    assert relative_difference(plain.logits, model(ids)) < TOLERANCE and plain.loss < ablated.loss
    # Mean ablation: the head's mean z over the reference's positions.
    reference = ids_of("the log sat on the cat")
    _, cache = plain_lens.run_with_cache(reference)
    mean = cache["z", 1][0, :, 2].mean(0)

    def to_mean(z: torch.Tensor, hook: object) -> torch.Tensor:
        z[:, :, 2] = mean
        return z

    mean_ablated = ablate_heads(model, ids, [(1, 2)], "mean", reference=reference)
    theirs = plain_lens.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", to_mean)])
    assert relative_difference(mean_ablated.logits, theirs) < TOLERANCE
    assert ablate_heads(model, ids_of("a"), [(0, 0)]).loss is None


def test_attention_patterns_are_the_cached_patterns(model: GPT2) -> None:
    ids = ids_of(PROMPT)
    _, cache = model.run_with_cache(ids)
    assert torch.equal(attention_patterns(model, ids, 1), cache["pattern", 1][0])
    assert torch.equal(attention_patterns(model, ids[0], -2), cache["pattern", 0][0])


# ----------------------------------------------------------------------------------------------------
# Bad inputs: one line each


def test_bad_analysis_inputs_are_one_line(model: GPT2) -> None:
    ids, metric = ids_of(PROMPT), logit_difference(1, 2)
    one_line_error(lambda: patch_residual(model, ids_of("abc"), ids_of("abcd"), metric), "3 tokens", "4",
                   "same number of tokens")
    one_line_error(lambda: patch_heads(model, ids_of("abc"), ids_of("abc"), metric), "no difference")
    one_line_error(lambda: patch_heads(model, ids_of("abc"), ids_of("abd"), lambda logits: logits[0, -1]),
                   "shape (257,)", "one number")
    one_line_error(lambda: attention_patterns(model, ids, 2), "layer 2", "2 layers (0 to 1)")
    one_line_error(lambda: ablate_heads(model, ids, [(0, 4)]), "head 4", "4 heads per layer (0 to 3)")
    one_line_error(lambda: ablate_heads(model, ids, [(0, 0)], "half"), "unknown ablation 'half'")
    one_line_error(lambda: ablate_heads(model, ids, [3]), "pairs (layer, head)")
    one_line_error(lambda: direct_logit_attribution(model, ids, 300), "300", "0 to 256")
    one_line_error(lambda: direct_logit_attribution(model, ids, 3, position=31), "position 31", "31 tokens")
    one_line_error(lambda: logit_lens(model, torch.cat([ids, ids])), "one prompt", "batch of 2")
    one_line_error(lambda: logit_lens(model, torch.rand(3)), "token ids", "float")
    one_line_error(lambda: logit_lens(model, torch.zeros(1, 65, dtype=torch.long)), "65", "context window")
    one_line_error(lambda: head_scores(model, ids_of("a")), "at least 2 tokens")
    one_line_error(lambda: repeated_tokens(257, 257, bos=256), "1 to 256")


# ----------------------------------------------------------------------------------------------------
# gpt2 inspect


def table(out: str, first: str) -> list[list[str]]:
    """The rows (cells at least two spaces apart) of the table printed under the header line that
    starts with ``first``, up to a line of one cell."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first + " "))
    rows = []
    for line in lines[start + 1 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) < 2:
            break
        rows.append(cells)
    return rows


def numbers(row: list[str]) -> list[float]:
    return [float(cell) for cell in row[1:]]


def test_inspect_lens_prints_the_top_tokens_and_plots(capsys: pytest.CaptureFixture, model: GPT2,
                                                      checkpoint: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "inspect", "lens", "--model", checkpoint, "--prompt", "the cat",
                             "--plot", tmp_path / "lens.png", "--device", "cpu")
    assert code == 0, err
    top = logit_lens(model, ids_of("the cat")).argmax(-1)
    rows = table(out, "layer")
    assert [row[0] for row in rows] == ["0_pre", "1_pre", "final_post"]
    assert [row[1:] for row in rows] == [[repr(chr(t)) for t in layer] for layer in top.tolist()]
    assert (tmp_path / "lens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, err = run_cli(capsys, "inspect", "lens", "--model", checkpoint, "--prompt", "<a & b>",
                             "--plot", tmp_path / "lens.html", "--device", "cpu")
    page = (tmp_path / "lens.html").read_text(encoding="utf-8")
    assert code == 0 and page.startswith("<!DOCTYPE html>") and "&lt;" in page and "&amp;" in page
    assert "<script" not in page and "http" not in page and "<a " not in page  # one file, its text escaped


def test_inspect_attribution_prints_the_library_figures(capsys: pytest.CaptureFixture, model: GPT2,
                                                        checkpoint: Path, tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "inspect", "attribution", "--model", checkpoint, "--prompt", PROMPT,
                             "--token", " ", "--wrong", "s", "--plot", tmp_path / "dla.html")
    assert code == 0, err
    parts = direct_logit_attribution(model, ids_of(PROMPT), 32, wrong=115)
    assert out.splitlines()[1].split() == ["layer", "H0", "H1", "H2", "H3", "MLP"]
    for layer, row in enumerate(table(out, "layer")):
        expected = [*parts.heads[layer].tolist(), parts.mlps[layer].item()]
        assert numbers(row) == pytest.approx(expected, abs=6e-5)
    assert f"{parts.logit:.4f}" in out.splitlines()[0] and f"sum to {parts.logit:.4f}" in out
    assert "H0" in (tmp_path / "dla.html").read_text(encoding="utf-8")
    # Without --token: the model's likeliest next token.
    code, out, err = run_cli(capsys, "inspect", "attribution", "--model", checkpoint, "--prompt",
                             "the cat sa")
    assert code == 0 and out.startswith("direct logit attribution of logit('t') at position 9"), out + err


@pytest.mark.parametrize("by", ["residual", "heads"])
def test_inspect_patch_prints_the_library_figures(capsys: pytest.CaptureFixture, model: GPT2,
                                                  checkpoint: Path, tmp_path: Path, by: str) -> None:
    code, out, err = run_cli(capsys, "inspect", "patch", "--model", checkpoint, "--clean", CLEAN,
                             "--corrupted", CORRUPTED, "--answer", "m", "--wrong", "l", "--by", by, "--plot",
                             tmp_path / "patch.png")
    assert code == 0, err
    call = patch_residual if by == "residual" else patch_heads
    expected = call(model, ids_of(CLEAN), ids_of(CORRUPTED), logit_difference(109, 108))
    rows = table(out, "layer")
    assert [row[0] for row in rows] == ["0", "1"]
    assert [numbers(row) for row in rows] == [pytest.approx(line, abs=6e-4) for line in expected.tolist()]
    if by == "residual":
        assert "'c'/'d'" in out and "'a'/'o'" in out and "'t'/'g'" in out
    assert (tmp_path / "patch.png").stat().st_size > 1000


def test_inspect_heads_prints_the_scores(capsys: pytest.CaptureFixture, model: GPT2, checkpoint: Path,
                                         tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "inspect", "heads", "--model", checkpoint, "--repeat", "10",
                             "--seed", "4", "--plot", tmp_path / "heads.html")
    assert code == 0, err
    scores = head_scores(model, repeated_tokens(10, 257, bos=256, seed=4))
    named = {"previous-token": scores.previous_token, "duplicate-token": scores.duplicate_token,
             "induction": scores.induction}
    for name, values in named.items():
        rows = table(out, name)
        assert [numbers(row) for row in rows] == [pytest.approx(line, abs=6e-4) for line in values.tolist()]
        best = values.flatten().argmax().item()
        assert f"top {name} heads: L{best // 4}H{best % 4} " in out
    assert (tmp_path / "heads.html").read_text(encoding="utf-8").count("<table>") == 3
    code, out, err = run_cli(capsys, "inspect", "heads", "--model", checkpoint, "--prompt", "abcdef")
    assert code == 0 and "note: no token of the prompt occurs twice" in out, err
    assert table(out, "induction")[0] == ["0", "-", "-", "-", "-"]


def test_inspect_attention_and_ablate(capsys: pytest.CaptureFixture, model: GPT2, checkpoint: Path,
                                      tmp_path: Path) -> None:
    code, out, err = run_cli(capsys, "inspect", "attention", "--model", checkpoint, "--prompt", "the cat",
                             "--layer", "-1", "--head", "2", "--plot", tmp_path / "attention.png")
    assert code == 0, err
    pattern = attention_patterns(model, ids_of("the cat"), 1)[2]
    rows = table(out, "head 2")
    assert [row[0] for row in rows] == [repr(c) for c in "the cat"]
    assert [len(row) for row in rows] == [2, 3, 4, 5, 6, 7, 8]  # the query's token, then its keys
    for query, row in enumerate(rows):
        assert numbers(row) == pytest.approx((100 * pattern[query, : query + 1]).tolist(), abs=0.51)
    code, out, err = run_cli(capsys, "inspect", "ablate", "--model", checkpoint, "--prompt", PROMPT,
                             "--head", "0.1", "--head", "1.3", "--mean")
    assert code == 0, err
    before = ablate_heads(model, ids_of(PROMPT), [])
    after = ablate_heads(model, ids_of(PROMPT), [(0, 1), (1, 3)], "mean")
    assert f"{before.loss:.4f} -> {after.loss:.4f}" in out


def test_inspect_runs_bf16_and_an_adapter(capsys: pytest.CaptureFixture, model_dir: Path,
                                          adapter_dir: Path) -> None:
    code, out, err = run_cli(capsys, "inspect", "lens", "--model", model_dir, "--prompt", "ab", "--precision",
                             "bf16")
    assert code == 0 and "final_post" in out, err
    code, out, err = run_cli(capsys, "inspect", "heads", "--adapter", adapter_dir, "--repeat", "3")
    assert code == 0 and "induction" in out, err


def test_inspect_bad_inputs_are_one_line(capsys: pytest.CaptureFixture, checkpoint: Path,
                                         tmp_path: Path) -> None:
    given = ["--model", checkpoint]
    cases = [
        (["patch", *given, "--clean", "abc", "--corrupted", "abcd", "--answer", "a", "--wrong", "b"],
         ["3 tokens", "4", "same number of tokens"]),
        (["patch", *given, "--clean", "abc", "--corrupted", "abd", "--answer", "ab", "--wrong", "b"],
         ["--answer 'ab' is 2 tokens", "one token"]),
        (["patch", *given, "--clean", "abc", "--corrupted", "abd", "--answer", "a", "--wrong", "a"],
         ["same token"]),
        (["patch", *given, "--clean", "abc", "--corrupted", "abd", "--answer", "a", "--wrong", "b",
          "--position", "3"], ["--position 3", "3 tokens"]),
        (["attention", *given, "--prompt", "ab", "--layer", "2"], ["layer 2 does not exist", "2 layers"]),
        (["attention", *given, "--prompt", "ab", "--layer", "0", "--head", "4"], ["head 4", "4 heads"]),
        (["ablate", *given, "--prompt", "ab", "--head", "3"], ["--head '3'", "LAYER.HEAD"]),
        (["ablate", *given, "--prompt", "ab", "--head", "0.7"], ["head 7 does not exist"]),
        (["lens", *given, "--prompt", "ab", "--precision", "int8"], ["int8", "fp32 or bf16"]),
        (["lens", *given, "--prompt", "ab", "--plot", tmp_path / "lens.pdf"], [".png or an .html"]),
        (["lens", *given, "--prompt", ""], ["--prompt is empty"]),
        (["lens", *given, "--prompt", "a" * 65], ["65 tokens", "context window"]),
        (["lens", *given, "--prompt", "ab", "--plot", checkpoint / "lens.png"],
         ["--plot", "inside the --model"]),
        (["heads", *given, "--repeat", "40"], ["--repeat 40", "1 to 31"]),
        (["heads", *given, "--prompt", "a"], ["one token"]),
        (["attribution", *given, "--prompt", "ab", "--position", "-3"], ["--position -3", "2 tokens"]),
        (["attribution", *given, "--prompt", "ab", "--token", ""], ["--token '' is 0 tokens"]),
        (["lens", "--prompt", "ab"], ["give --model"]),
    ]
    for argv, words in cases:
        code, _, err = run_cli(capsys, "inspect", *argv)
        assert_one_line_error(code, err, *words)
    assert not list(tmp_path.iterdir())

