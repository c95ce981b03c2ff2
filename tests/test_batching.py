"""Decoding several answers together gives each the tokens it gets alone.

`generate` on each (image, prompt) pair is the reference: prompts of different lengths and different budgets, so
that rows have different lengths, end at different steps and free rows that later pairs reuse.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CHECKPOINT_NAMES, ROOT, noise_image
from molmocap.runtime import Captioner
from molmocap.runtime.batching import DecodeBatch
from molmocap.runtime.demo import DEMO_MODEL_DIR
from molmocap.runtime.errors import InputError
from molmocap.runtime.preprocess import preprocess
from molmocap.runtime.vision import encode_image

IMAGES = [noise_image(300, 520, seed=1), noise_image(640, 240, seed=2), noise_image(9, 13, seed=3),
          noise_image(200, 200, seed=4), noise_image(120, 380, seed=5)]
PROMPTS = ["Describe this image.", "How many red circles are there, and where is the largest one?", "Color?",
           None, "What is the word printed on the sign in the lower left corner of the picture?"]
BUDGETS = [12, 5, 20, 9, 16]


def alone(captioner: Captioner, images, prompts, budgets, max_crops=None) -> list[list[int]]:
    return [captioner.generate(image, prompt, budget, max_crops).token_ids
            for image, prompt, budget in zip(images, prompts, budgets)]


@pytest.mark.parametrize("variant", CHECKPOINT_NAMES)
def test_batched_tokens_equal_each_alone_on_the_parity_configs(variant, exported):
    captioner = Captioner.load(exported[variant], threads=1)
    expected = alone(captioner, IMAGES, PROMPTS, BUDGETS, max_crops=2)
    for max_batch in (2, 5):
        results = captioner.generate_batch(IMAGES, PROMPTS, BUDGETS, max_crops=2, max_batch=max_batch)
        assert [result.token_ids for result in results] == expected, f"max_batch {max_batch}"
        assert [result.prompt_tokens for result in results] == [
            captioner.generate(image, prompt, 1, 2).prompt_tokens for image, prompt in zip(IMAGES, PROMPTS)]


def test_batched_answers_equal_each_alone_on_the_demo_model():
    captioner = Captioner.load(DEMO_MODEL_DIR, threads=1)
    images = [ROOT / "examples" / "shapes.png", *IMAGES[:3]]
    prompts = ["Describe this image in detail.", "What color is the circle?", None, "How many triangles?"]
    budgets = [40, 8, 24, 32]
    results = captioner.generate_batch(images, prompts, budgets, max_batch=3)
    for result, image, prompt, budget in zip(results, images, prompts, budgets):
        single = captioner.generate(image, prompt, budget)
        assert (result.text, result.token_ids) == (single.text, single.token_ids)


def test_int8_step_graphs_step_rows_alone_and_keep_the_tokens(quantized):
    """int8 activations are quantized with one scale for all rows, so an int8 step graph must not mix rows."""
    captioner = Captioner.load(quantized["int8"], threads=1)
    assert not DecodeBatch(captioner).rows_independent
    results = captioner.generate_batch(IMAGES[:3], PROMPTS[:3], BUDGETS[:3], max_crops=1, max_batch=3)
    assert [result.token_ids for result in results] == alone(captioner, IMAGES[:3], PROMPTS[:3], BUDGETS[:3], 1)


def test_a_row_reused_after_a_longer_sequence_does_not_see_its_stale_positions(exported):
    """A short prompt joins the row a long answer left: positions past the row's own length still hold the long
    sequence's keys and values, which the step must not attend to."""
    captioner = Captioner.load(exported["qwen3_gqa"], threads=1)
    batch = DecodeBatch(captioner, max_batch=1)
    long = captioner.start(IMAGES[0], "Describe everything in this picture, every object and its color.", 30, 4)
    batch.join(long)
    while batch:
        batch.step()
    short = captioner.start(IMAGES[2], "Color?", 10, 1)
    batch.join(short)
    while batch:
        batch.step()
    assert short.result().token_ids == captioner.generate(IMAGES[2], "Color?", 10, 1).token_ids


def test_sequences_join_and_leave_between_steps_without_changing_the_others(exported):
    captioner = Captioner.load(exported["qwen3_gqa"], threads=1)
    expected = alone(captioner, IMAGES[:3], PROMPTS[:3], [20, 20, 20], max_crops=1)
    batch = DecodeBatch(captioner, max_batch=3)
    first = captioner.start(IMAGES[0], PROMPTS[0], 20, 1)
    batch.join(first)
    for _ in range(4):
        batch.step()
    late = captioner.start(IMAGES[1], PROMPTS[1], 20, 1)  # joins after four of first's tokens
    dropped = captioner.start(IMAGES[2], PROMPTS[2], 20, 1)
    batch.join(late)
    batch.join(dropped)
    batch.step()
    batch.leave(dropped)  # a request given up on
    while batch:
        batch.step()
    assert first.result().token_ids == expected[0]
    assert late.result().token_ids == expected[1]
    assert dropped.tokens == expected[2][: len(dropped.tokens)]


def test_streamed_pieces_stay_with_their_own_answer_and_a_failing_consumer_ends_only_its_own(exported):
    captioner = Captioner.load(exported["qwen3_gqa"], threads=1)
    pieces: list[list[str]] = [[], []]

    def refuse(piece: str) -> None:
        raise RuntimeError("the client left")

    batch = DecodeBatch(captioner, max_batch=3)
    streamed = [captioner.start(IMAGES[i], PROMPTS[i], 16, 1, on_text=pieces[i].append) for i in range(2)]
    failing = captioner.start(IMAGES[2], PROMPTS[0], 16, 1, on_text=refuse)
    for generation in (*streamed, failing):
        batch.join(generation)
    left = []
    while batch:
        left += batch.step()
    assert left[0] is failing and isinstance(failing.error, RuntimeError)
    for generation, own in zip(streamed, pieces):
        result = generation.result()
        assert generation.error is None and "".join(own) == result.text
        assert result.token_ids == captioner.generate(IMAGES[streamed.index(generation)],
                                                      PROMPTS[streamed.index(generation)], 16, 1).token_ids


def test_joined_sequences_hand_their_positions_to_the_batch(exported):
    captioner = Captioner.load(exported["qwen3_gqa"], threads=1)
    generation = captioner.start(IMAGES[2], "Color?", 4, 1)
    alone_cache = generation.state.cache
    batch = DecodeBatch(captioner, max_batch=1)
    batch.join(generation)
    assert generation.state.batch is batch and generation.state.cache is not alone_cache and batch.full
    with pytest.raises(ValueError):
        batch.join(captioner.start(IMAGES[2], "Color?", 4, 1))
    with pytest.raises(ValueError):
        captioner.step(generation.state, 5)
    while batch:
        batch.step()
    assert generation.state.cache is None and generation.state.batch is None  # its row went back to the batch
    assert len(generation.result().token_ids) <= 4 and np.isfinite(generation.state.logits).all()


def test_a_sequence_prefilled_into_the_batch_takes_its_reserved_row_without_a_copy(exported):
    captioner = Captioner.load(exported["qwen3_gqa"], threads=1)
    batch = DecodeBatch(captioner, max_batch=2)
    first = captioner.start(IMAGES[0], PROMPTS[0], 6, 1, batch=batch)
    second = captioner.start(IMAGES[1], PROMPTS[1], 6, 1, batch=batch)
    assert (first.state.row, second.state.row) == (0, 1) and first.state.cache is second.state.cache
    assert batch.members == [first, second] and batch.full
    with pytest.raises(InputError):  # a refused input gives its reserved row back
        captioner.start(IMAGES[2], "x " * 5000, 6, 1, batch=DecodeBatch(captioner, max_batch=1))
    while batch:
        batch.step()
    assert [first.result().token_ids, second.result().token_ids] == alone(
        captioner, IMAGES[:2], PROMPTS[:2], [6, 6], max_crops=1)


@pytest.mark.parametrize("compact", [True, False])
def test_freed_rows_are_refilled_by_moving_the_last_row_or_kept_for_the_next_sequence(compact, exported):
    """On the CPU a leaving row is filled by the last one (no dummy rows to compute); on a GPU (compact=False) it
    stays free, and later steps feed it a dummy token. Both give every sequence its own tokens."""
    captioner = Captioner.load(exported["qwen3_gqa"], threads=1)
    budgets = [3, 12, 12, 9]
    expected = alone(captioner, IMAGES[:4], PROMPTS[:4], budgets, max_crops=1)
    batch = DecodeBatch(captioner, max_batch=3, compact=compact)
    started = [captioner.start(IMAGES[i], PROMPTS[i], budgets[i], 1, batch=batch) for i in range(3)]
    while started[0].state.batch is not None:
        batch.step()
    assert started[2].state.row == (0 if compact else 2)
    for _ in range(2):
        batch.step()
    late = captioner.start(IMAGES[3], PROMPTS[3], budgets[3], 1, batch=batch)  # takes the free row
    assert late.state.row == (2 if compact else 0)
    while batch:
        batch.step()
    assert [generation.result().token_ids for generation in [*started, late]] == expected


def test_the_step_graph_picks_the_greedy_token_itself(exported):
    """A decoder exported now returns `next_token` (ArgMax), so a GPU run need not send back the logits; it is the
    first highest logit, as numpy picks it."""
    captioner = Captioner.load(exported["qwen3_gqa"], threads=1)
    assert "next_token" in {arg.name for arg in captioner.decoder.step_session.get_outputs()}
    state = captioner.prefill(IMAGES[0], PROMPTS[0], 8, 1)
    for _ in range(6):
        assert state.greedy_token == int(np.argmax(state.logits))
        captioner.step(state, state.greedy_token)


def test_a_gpu_runs_all_crops_at_once_with_the_same_embeddings(exported):
    captioner = Captioner.load(exported["qwen3_gqa"], threads=1)
    inputs = preprocess(IMAGES[1], captioner.preprocess_config, 4)
    assert len(inputs.patches) > 2
    one_by_one = encode_image(captioner.vision, captioner.adapter, inputs)
    together = encode_image(captioner.vision, captioner.adapter, inputs, batch_crops=True)
    np.testing.assert_allclose(together, one_by_one, rtol=1e-5, atol=1e-5)


def test_4bit_batched_answers_do_not_depend_on_their_batchmates(quantized):
    """MatMulNBits computes rows in pairs with one kernel and a lone row with another; a 4-bit step always runs an
    even number of rows, so a sequence's logits are the same bit for bit beside one batchmate or two."""
    captioner = Captioner.load(quantized["int4"], threads=1)
    assert DecodeBatch(captioner).even_rows
    logits = []
    for companions in ([0], [0, 1]):  # the watched sequence ends up in row 1, then in row 2 of three
        batch = DecodeBatch(captioner, max_batch=3)
        for i in companions:
            captioner.start(IMAGES[i], PROMPTS[i], 8, 1, batch=batch)
        watched = captioner.start(IMAGES[3], PROMPTS[3], 8, 1, batch=batch)
        rows = []
        for _ in range(5):
            batch.step()
            rows.append(watched.state.logits.copy())
        logits.append(np.stack(rows))
    np.testing.assert_array_equal(logits[0], logits[1])


def test_group_query_attention_reads_each_row_only_up_to_its_own_seqlens_k(exported):
    """The step graph with an all-zero bias over rows of different lengths, the positions past each row's length
    full of noise: every row's logits equal its own single step. So GroupQueryAttention itself stops at
    seqlens_k[r] (the runtime's bias masks those positions as well)."""
    captioner = Captioner.load(exported["qwen3_gqa"], threads=1)
    states = [captioner.prefill(IMAGES[0], PROMPTS[1], 4, 2), captioner.prefill(IMAGES[2], PROMPTS[2], 4, 1)]
    cache = captioner.decoder.new_cache(max(state.cache.capacity for state in states) + 8, rows=2)
    for row, state in enumerate(states):
        cache.copy_row(state.cache, 0, row)
    rng = np.random.default_rng(0)
    for array in cache.arrays.values():
        for row, length in enumerate(cache.lengths):
            array[row, :, length:] = rng.normal(size=array[row, :, length:].shape)
    tokens = [state.greedy_token for state in states]
    lengths = np.array(cache.lengths, dtype=np.int32)
    session = captioner.decoder.step_session
    binding = session.io_binding()
    binding.bind_output("logits")
    binding.bind_cpu_input("inputs_embeds", captioner.embed(np.array(tokens, dtype=np.int64)[:, None]))
    binding.bind_cpu_input("attention_bias", np.zeros((2, 1, 1, lengths.max() + 1), dtype=np.float32))
    binding.bind_cpu_input("seqlens_k", lengths)
    binding.bind_cpu_input("total_sequence_length", np.array(lengths.max() + 1, dtype=np.int32))
    cache.bind(binding, 0, 2)
    session.run_with_iobinding(binding)
    batched = binding.get_outputs()[0].numpy()
    assert lengths[0] != lengths[1]
    for row, (state, token) in enumerate(zip(states, tokens)):
        np.testing.assert_array_equal(batched[row], captioner.step(state, token))
