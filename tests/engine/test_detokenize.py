"""Incremental detokenization: deltas concatenate to the text, stop strings never leak, even split
across tokens, and incomplete characters wait for their next token."""

from __future__ import annotations

from engine.detokenize import IncrementalDetokenizer


class FakeTokenizer:
    def __init__(self, pieces: dict[int, bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True) -> str:  # noqa: ANN001
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


PIECES = {1: b"Hel", 2: b"lo", 3: b" wor", 4: b"ld", 5: b"\xc3", 6: b"\xa9", 7: b" EN", 8: b"D!", 9: b"."}


def run(tokens: list[int], stop=()) -> tuple[list[str], bool, str]:  # noqa: ANN001
    d = IncrementalDetokenizer(FakeTokenizer(PIECES), stop)
    deltas, stopped = [], False
    for t in tokens:
        delta, stopped = d.push(t)
        deltas.append(delta)
        if stopped:
            break
    deltas.append(d.finish())
    return deltas, stopped, d.text


def test_deltas_concatenate_to_the_text() -> None:
    deltas, stopped, text = run([1, 2, 3, 4])
    assert "".join(deltas) == "Hello world" == text and not stopped


def test_incomplete_utf8_waits_for_the_next_token() -> None:
    deltas, _, text = run([1, 5, 6])
    assert deltas[1] == "" and "".join(deltas) == "Hel\u00e9" == text


def test_stop_string_split_across_tokens_never_shows() -> None:
    deltas, stopped, text = run([1, 2, 7, 8, 3], stop=("END",))
    assert stopped and text == "Hello " and "".join(deltas) == "Hello "
    assert all("E" not in d for d in deltas)


def test_holdback_is_released_at_the_end() -> None:
    deltas, stopped, text = run([1, 2, 9], stop=("END",))
    assert not stopped and "".join(deltas) == "Hello." == text


def test_windowed_decoding_equals_a_full_decode_on_the_real_tokenizer(embedded_model_dir) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    text = ("Tokenizers merge pieces:  double  spaces, naïve café, emoji 🙂🙂, code `x = f(y)`\n\tand "
            "CJK 東京, numbers 1234567, and a long tail of ordinary words to cross many windows.")
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok)
    shown = "".join(d.push(t)[0] for t in ids) + d.finish()
    assert shown == tok.decode(ids, skip_special_tokens=True) == d.text


def test_stop_string_found_across_windows(embedded_model_dir) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    ids = tok.encode("one two three four five six seven eight nine ten eleven twelve")
    d = IncrementalDetokenizer(tok, stop=("ten el",))
    shown, stopped = "", False
    for t in ids:
        delta, stopped = d.push(t)
        shown += delta
        if stopped:
            break
    assert stopped and shown + d.finish() == "one two three four five six seven eight nine "


def test_llm_stops_at_a_stop_string_and_cuts_it(embedded_model_dir) -> None:  # noqa: ANN001
    from engine.llm import LLM, EngineConfig
    from engine.sampling import SamplingParams

    llm = LLM(EngineConfig(model=str(embedded_model_dir), num_slots=1, max_seq_len=256))
    full = llm.generate(["Tell me about the moon."], SamplingParams(max_tokens=40, ignore_eos=True), chat=True)[0]
    stop = full.text[20:26]
    assert stop.strip() and full.text.find(stop) >= 20 - 6
    out = llm.generate(["Tell me about the moon."], SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,)),
                       chat=True)[0]
    assert out.finish_reason == "stop" and out.text == full.text[: full.text.find(stop)]
    assert len(out.token_ids) < len(full.token_ids)
