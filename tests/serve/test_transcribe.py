"""qva-serve's audio endpoints end to end: a real server process on the tiny demo checkpoints (fp32), driven by the
official `openai` client (`client.audio.transcriptions.create`, each response format, streamed and not) and by raw
form uploads. With random weights the text is noise, so what is checked is where it comes from: each window's text
equals offline greedy `generate` on the same piece of audio and instruction, the windows are the clip's speech cut
at its pauses (their times, their count), they run batched in the engine's rows, and every bad upload is a 4xx."""

from __future__ import annotations

import io
import json
import random
import threading
import time
from http.client import HTTPConnection

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import SHARED, ServeProcess, demo_server, http, need_shared, speechlike
from serve_helpers import bursts, connect, digits_clip, form, metric, post_form, read_answer, until, wav, wav_bytes

import qva
from qva.audio import SAMPLE_RATE, clip_tokens, split_at_pauses
from qva.generate import eos_ids
from qva.serve import multipart
from qva.serve.errors import APIError
from qva.serve.transcribe import DEFAULT_TRANSCRIBE_PROMPT, DEFAULT_TRANSLATE_PROMPT, trained_prompt

openai = pytest.importorskip("openai")
KEY = "sk-test"
NAME = "tiny"
TOKENS = 6  # --transcribe-max-tokens: each window's answer (the random model never ends one sooner)
ROWS = 4  # --max-batch
TRANSCRIBE = "/v1/audio/transcriptions"
DIGITS = SHARED / "spoken-digits"


@pytest.fixture(scope="module")
def server(demo_dirs):
    srv = demo_server(demo_dirs, KEY, NAME, "--max-batch", str(ROWS), "--transcribe-max-tokens", str(TOKENS))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def offline(demo_fp32):
    return demo_fp32


def offline_window(model, wave: torch.Tensor, instruction: str, prompt: str | None = None) -> str:
    """Greedy `generate` on one window as the server asks it: [system prompt,] user [audio, instruction]."""
    messages = [{"role": "system", "content": prompt}] if prompt else []
    messages.append({"role": "user", "content": [{"type": "audio", "audio": wave}, {"type": "text", "text": instruction}]})
    inputs = model.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    out = model.generate(**inputs, max_new_tokens=TOKENS)[0, inputs["input_ids"].shape[1]:].tolist()
    out = out[: next((i for i, t in enumerate(out) if t in eos_ids(None)), len(out))]
    return model.processor.decode(out).strip()


# a 70 s clip: speech-like bursts with pauses between them; the splitter must cut in the pauses
SPANS = [(0.5, 12.0), (12.6, 27.0), (27.5, 41.0), (43.0, 56.0), (60.0, 69.5)]
CLIP = wav_bytes(bursts(SPANS, 70.0))


@pytest.fixture(scope="module")
def verbose(client):
    return client.audio.transcriptions.create(file=("talk.wav", CLIP, "audio/wav"), model=NAME, response_format="verbose_json",
                                              timestamp_granularities=["segment"], temperature=0)


def test_windows_are_cut_in_pauses_and_each_equals_offline_generate(verbose, offline):
    wave = qva.load_audio(CLIP)
    pieces = split_at_pauses(wave)
    segs = verbose.segments
    assert verbose.duration == 70.0 and verbose.task == "transcribe" and verbose.usage.seconds == 70.0
    assert [(s.start, s.end) for s in segs] == [(round(a / SAMPLE_RATE, 3), round(b / SAMPLE_RATE, 3)) for a, b in pieces]
    assert all(s.end - s.start <= 30 for s in segs) and len(segs) == 3
    for s in segs:  # every cut lies in a pause, never inside a burst
        for a, b in SPANS:
            assert not (a < s.start < b) and not (a < s.end < b), (s.start, s.end)
    covered = [any(s.start <= a and b <= s.end for s in segs) for a, b in SPANS]
    assert all(covered)
    for s, (a, b) in zip(segs, pieces):
        assert s.text == offline_window(offline, wave[a:b], DEFAULT_TRANSCRIBE_PROMPT) and s.text
        assert len(s.tokens) == TOKENS and s.avg_logprob < 0 and s.temperature == 0 and s.seek == a // 160
    assert verbose.text == " ".join(s.text for s in segs)


def test_every_response_format_says_the_same(client, verbose):
    segs, text = verbose.segments, verbose.text
    kw = dict(file=("talk.wav", CLIP, "audio/wav"), model=NAME, temperature=0)
    r = client.audio.transcriptions.create(**kw)
    assert r.text == text and r.usage.type == "tokens" and r.usage.output_tokens == TOKENS * len(segs)
    assert r.usage.input_token_details.audio_tokens == sum(clip_tokens(round((s.end - s.start) * SAMPLE_RATE)) for s in segs)
    assert client.audio.transcriptions.create(**kw, response_format="text") == text + "\n"

    def clock(t, sep):
        ms = round(t * 1000)
        return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"

    srt = client.audio.transcriptions.create(**kw, response_format="srt")
    assert srt == "".join(f"{i}\n{clock(s.start, ',')} --> {clock(s.end, ',')}\n{s.text}\n\n" for i, s in enumerate(segs, 1))
    vtt = client.audio.transcriptions.create(**kw, response_format="vtt")
    assert vtt == "WEBVTT\n\n" + "".join(f"{clock(s.start, '.')} --> {clock(s.end, '.')}\n{s.text}\n\n" for s in segs)
    assert "00:00:" in srt and "," in srt.split("\n")[1] and "." in vtt.split("\n")[2]


def test_streamed_deltas_join_into_the_text(client, verbose):
    events = list(client.audio.transcriptions.create(file=("talk.wav", CLIP, "audio/wav"), model=NAME, stream=True, temperature=0))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    done = events[-1]
    assert done.type == "transcript.text.done" and [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1)
    assert "".join(e.delta for e in deltas) == done.text == verbose.text and len(deltas) > len(verbose.segments)
    assert done.usage.output_tokens == TOKENS * len(verbose.segments)


def test_windows_are_decoded_as_one_batch(server, client):
    """100 s in four bursts of speech: 4 windows, the engine's 4 rows, every decode step over all of them."""
    raw = wav_bytes(bursts([(0.5, 22.0), (25.0, 47.0), (50.0, 72.0), (75.0, 97.0)], 100.0))
    steps, rows = metric(server, "qva_decode_steps_total"), metric(server, "qva_decode_rows_total")
    r = client.audio.transcriptions.create(file=("long.wav", raw), model=NAME, response_format="verbose_json")
    assert [(s.start, s.end) for s in r.segments] == [(0.3, 22.2), (24.8, 47.2), (49.8, 72.2), (74.8, 97.2)]
    steps, rows = metric(server, "qva_decode_steps_total") - steps, metric(server, "qva_decode_rows_total") - rows
    assert (steps, rows) == (TOKENS - 1, ROWS * (TOKENS - 1))  # the first token of each comes from its prefill


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the openai client marks translations deprecated
def test_a_prompt_and_a_translation(client, offline):
    raw = wav(8.0, 3)
    wave = qva.load_audio(raw)
    r = client.audio.transcriptions.create(file=("a.wav", raw), model=NAME, prompt="Names: Ada, Grace.", language="en",
                                           response_format="verbose_json")
    assert r.text == offline_window(offline, wave, DEFAULT_TRANSCRIBE_PROMPT, "Names: Ada, Grace.") and r.language == "en"
    t = client.audio.translations.create(file=("a.wav", raw), model=NAME, response_format="verbose_json")
    assert t.text == offline_window(offline, wave, DEFAULT_TRANSLATE_PROMPT) and t.language == "english" and t.task == "translate"
    assert t.text != r.text


@need_shared(DIGITS)
def test_95_s_of_digits_in_silence_and_noise_are_three_segments_at_their_times(client, server):
    """Three spoken-digit clips (6, 40 and 80 s into 95 s of silence and noise): three segments, each starting just
    before its clip's speech and ending just after it. (The random model's text is noise; with the trained
    spoken-digits model, which this session does not have, the text would be checked too.)"""
    wave, spans = digits_clip(DIGITS)
    seconds = metric(server, "qva_transcribed_audio_seconds_total")
    r = client.audio.transcriptions.create(file=("digits.flac", wav_bytes(wave, fmt="FLAC")), model=NAME, response_format="verbose_json")
    assert r.duration == 95.0 and metric(server, "qva_transcribed_audio_seconds_total") - seconds == 95.0
    assert len(r.segments) == 3, [(s.start, s.end) for s in r.segments]
    for s, (on, off) in zip(r.segments, spans):
        assert on - 0.5 <= s.start <= on and off <= s.end <= off + 0.5, ((s.start, s.end), (on, off))
    srt = client.audio.transcriptions.create(file=("digits.flac", wav_bytes(wave, fmt="FLAC")), model=NAME, response_format="srt")
    assert srt.count(" --> ") == 3


def test_20_minutes_reach_the_model_whole(server, client):
    """20 min without a pause: ≥ 40 windows of ≤ 30 s tiling the clip; every sample's tokens are in the prompts."""
    n = 20 * 60 * SAMPLE_RATE
    raw = wav_bytes(speechlike(20 * 60, 7))
    windows, prompt_tokens = metric(server, "qva_transcribed_windows_total"), metric(server, "qva_prompt_tokens_total")
    r = client.audio.transcriptions.create(file=("lecture.wav", raw), model=NAME, response_format="verbose_json")
    segs = r.segments
    assert r.duration == 1200.0 and len(segs) >= 40 and all(s.end - s.start <= 30 for s in segs) and all(s.text for s in segs)
    assert segs[0].start == 0 and segs[-1].end == 1200.0 and all(a.end == b.start for a, b in zip(segs, segs[1:]))
    assert metric(server, "qva_transcribed_windows_total") - windows == len(segs)
    cuts = [0] + [round(s.end * SAMPLE_RATE) for s in segs]
    audio = sum(clip_tokens(b - a) for a, b in zip(cuts, cuts[1:]))  # each window's audio tokens, in its prompt
    assert cuts[-1] == n and audio >= clip_tokens(n)
    text = metric(server, "qva_prompt_tokens_total") - prompt_tokens - audio  # the same instruction around each window
    assert text > 0 and text % len(segs) == 0


# -- bad uploads: a 4xx naming the problem, never a 5xx ----------------------------------------------------------------------
def nan_wav() -> bytes:
    return wav_bytes(np.array([0.1, float("nan"), 0.2] * 800, np.float32), subtype="FLOAT")


def flac_claiming(total: int | None) -> bytes:
    """One second of noise as FLAC whose STREAMINFO claims `total` samples (None: 0, "unknown", as a streaming encoder leaves it)."""
    raw = bytearray(wav_bytes(0.1 * np.random.default_rng(0).standard_normal(16000), fmt="FLAC"))
    info = int.from_bytes(raw[18:26], "big")
    raw[18:26] = ((info & ~((1 << 36) - 1)) | (total or 0)).to_bytes(8, "big")
    return bytes(raw)


def one_hz_wav() -> bytes:
    return wav_bytes(np.zeros(20_000, np.float32), rate=1)


def two_hour_flac() -> bytes:
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", 16000, 1, format="FLAC") as f:
        for _ in range(120):
            f.write(np.zeros(16000 * 60, np.int16))
    return buf.getvalue()


def half(body: bytes, ctype: str) -> tuple[bytes, str]:
    return body[: len(body) // 2], ctype


GOOD = {"model": NAME}
CLIP_FILE = ("a.wav", wav(1.0, 0), "audio/wav")
BAD = {
    "no file": (form(GOOD), 400, "missing_file", "'file' is required"),
    "file as a text field": (form({**GOOD, "file": "hello"}), 400, "invalid_type", "must be a file part"),
    "empty file": (form(GOOD, ("a.wav", b"", "audio/wav")), 400, "empty_file", "'file' is empty"),
    "not audio": (form(GOOD, ("a.wav", b"hello, this is not audio", "audio/wav")), 400, "invalid_audio", "cannot decode the audio"),
    "webm (no decoder)": (form(GOOD, ("a.webm", b"\x1aE\xdf\xa3" + bytes(200), "audio/webm")), 400, "invalid_audio", "readable: wav"),
    "NaN samples": (form(GOOD, ("nan.wav", nan_wav(), "audio/wav")), 400, "invalid_audio", "NaN/inf"),
    "header without a length": (form(GOOD, ("s.flac", flac_claiming(None), "audio/flac")), 400, "invalid_audio", "does not give its length"),
    "header claiming 2 h": (form(GOOD, ("s.flac", flac_claiming(7200 * 16000), "audio/flac")), 400, "audio_too_long", "lasts 7200.0 s"),
    "header claiming 1 Hz": (form(GOOD, ("s.wav", one_hz_wav(), "audio/wav")), 400, "invalid_audio", "says 1 Hz"),
    "too long (2 h of silence)": (form(GOOD, ("s.flac", two_hour_flac(), "audio/flac")), 400, "audio_too_long", "(--max-audio-seconds)"),
    "no model": (form({}, CLIP_FILE), 400, "missing_model", "'model' is required"),
    "unknown model": (form({"model": "whisper-1"}, CLIP_FILE), 404, "model_not_found", "serves 'tiny'"),
    "unknown fields": (form({**GOOD, "chunking_strategy": "auto", "foo": "1"}, CLIP_FILE), 400, "unknown_parameter",
                       "'chunking_strategy', 'foo'"),
    "response_format diarized_json": (form({**GOOD, "response_format": "diarized_json"}, CLIP_FILE), 400, "unsupported_value",
                                      "json, text, verbose_json, srt, vtt"),
    "stream with srt": (form({**GOOD, "stream": "true", "response_format": "srt"}, CLIP_FILE), 400, "unsupported_value", "json or text"),
    "stream = yes": (form({**GOOD, "stream": "yes"}, CLIP_FILE), 400, "invalid_type", "true or false"),
    "word timestamps": (form({**GOOD, "timestamp_granularities[]": "word"}, CLIP_FILE), 400, "unsupported_value", "only 'segment'"),
    "temperature 3": (form({**GOOD, "temperature": "3"}, CLIP_FILE), 400, "invalid_value", "between 0 and 1"),
    "temperature hot": (form({**GOOD, "temperature": "hot"}, CLIP_FILE), 400, "invalid_type", "a number"),
    "language english": (form({**GOOD, "language": "english"}, CLIP_FILE), 400, "invalid_value", "ISO-639-1"),
    "model twice": (form([("model", NAME), ("model", NAME)], CLIP_FILE), 400, "invalid_value", "given 2 times"),
    "translation with language": (form({**GOOD, "language": "de"}, CLIP_FILE), 400, "unknown_parameter", "'language'"),
    "JSON body": ((json.dumps({"model": NAME}).encode(), "application/json"), 400, "invalid_content_type", "multipart/form-data"),
    "no boundary": ((b"x", "multipart/form-data"), 400, "invalid_content_type", "no valid boundary"),
    "cut short": (half(*form(GOOD, CLIP_FILE)), 400, "invalid_multipart", "no closing boundary"),
    "part without a name": ((b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--\r\n", "multipart/form-data; boundary=b"), 400,
                            "invalid_multipart", "no 'Content-Disposition"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_uploads_are_named_4xx(server, case):
    (body, ctype), status, code, says = BAD[case]
    path = "/v1/audio/translations" if case.startswith("translation") else TRANSCRIBE
    got, raw = post_form(server, path, body, ctype, KEY)
    err = json.loads(raw)["error"]
    assert (got, err["code"]) == (status, code), err
    assert says in err["message"] and set(err) == {"message", "type", "param", "code"}, err


def test_key_and_body_limit(server):
    body, ctype = form(GOOD, CLIP_FILE)
    status, raw = post_form(server, TRANSCRIBE, body, ctype)
    assert status == 401 and json.loads(raw)["error"]["code"] == "invalid_api_key"
    with connect(server) as sock:  # a Content-Length over --max-body-bytes
        sock.sendall(f"POST {TRANSCRIBE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {2**30}\r\n\r\n".encode())
        answer = read_answer(sock, time.monotonic() + 10)
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer


def test_a_model_without_an_audio_encoder(demo_dirs):
    srv = ServeProcess("--model", str(demo_dirs[0]), "--dtype", "fp32", "--served-model-name", NAME)
    try:
        status, raw = post_form(srv, TRANSCRIBE, *form(GOOD, CLIP_FILE))
        err = json.loads(raw)["error"]
        assert (status, err["code"]) == (400, "model_cannot_hear") and "no audio encoder" in err["message"]
    finally:
        srv.stop()


def test_fuzzed_forms_never_5xx(server):
    rng = random.Random(0)
    names = ["file", "model", "prompt", "language", "response_format", "temperature", "stream", "timestamp_granularities[]", "x"]
    values = ["", NAME, "json", "srt", "true", "1", "-1", "nan", "en", "é", "segment", "x" * 300]
    statuses = []
    for i in range(120):
        fields = [(rng.choice(names), rng.choice(values)) for _ in range(rng.randrange(5))]
        file = None
        if rng.random() < 0.7:
            data = rng.choice([wav(0.3, i), b"", b"RIFF" + bytes(rng.randrange(60)), nan_wav(), rng.randbytes(rng.randrange(1, 300))])
            file = ("f.wav", data, "audio/wav")
        body, ctype = form(fields, file)
        if rng.random() < 0.2:
            body = body[: rng.randrange(len(body))]
        statuses.append(post_form(server, TRANSCRIBE, body, ctype, KEY)[0])
    assert max(statuses) < 500 and min(statuses) >= 200
    assert post_form(server, TRANSCRIBE, *form(GOOD, CLIP_FILE), KEY)[0] == 200


def test_concurrent_uploads_all_answer(server, client):
    answers = {}

    def ask(i):
        answers[i] = client.audio.transcriptions.create(file=("a.wav", wav(3.0 + i, i)), model=NAME).text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 6 and all(answers.values())


# -- pieces of the endpoint, without a server -----------------------------------------------------------------------------
def test_multipart_parsing():
    fields = [("model", "m"), ("prompt", 'a "quoted"\r\nline')]
    body, ctype = form(fields, ('we;ird \\"name\\".wav', b"\r\n--not-the-boundary\r\n", "audio/wav"))  # a quoted-string escape
    parts = multipart.parse_form(b"preamble\r\n" + body + b"epilogue", ctype)
    assert [(p.name, p.data, p.filename) for p in parts] == [("model", b"m", None), ("prompt", b'a "quoted"\r\nline', None),
                                                              ("file", b"\r\n--not-the-boundary\r\n", 'we;ird "name".wav')]
    assert parts[2].content_type == "audio/wav"
    assert multipart.header_params('form-data; name="a\\"b"; filename=c.wav') == ("form-data", {"name": 'a"b', "filename": "c.wav"})
    with pytest.raises(APIError, match="more than 64 parts"):
        multipart.parse_form(form([("x", i) for i in range(65)])[0], ctype)


def test_trained_prompt_is_what_serve_asks(tmp_path, demo_dirs):
    from qva.serve.cli import parse_args, settings_and_loader

    assert trained_prompt(tmp_path) is None
    (tmp_path / "train_config.json").write_text(json.dumps({"prompt": "Write the digits you hear.", "stage": "2"}))
    assert trained_prompt(None, tmp_path) == "Write the digits you hear."
    run = tmp_path / "run"
    import shutil

    shutil.copytree(demo_dirs[0], run)
    (run / "train_config.json").write_text(json.dumps({"prompt": "Write the digits you hear."}))
    settings, _ = settings_and_loader(parse_args(["--model", str(run)]))
    assert settings.transcribe_prompt == "Write the digits you hear." and settings.translate_prompt == DEFAULT_TRANSLATE_PROMPT
    settings, _ = settings_and_loader(parse_args(["--model", str(run), "--transcribe-prompt", "Say it."]))
    assert settings.transcribe_prompt == "Say it."
    settings, _ = settings_and_loader(parse_args(["--model", str(demo_dirs[0])]))
    assert settings.transcribe_prompt == DEFAULT_TRANSCRIBE_PROMPT and settings.transcribe_max_tokens == 448


def test_a_client_that_leaves_frees_the_rows_and_a_full_queue_is_429(demo_dirs):
    """One row, one queue place, long answers: an upload whose client leaves mid-way frees its row at once (499);
    while a streamed chat holds the row and another waits, an upload is refused with 429 at once."""
    qwen, whisper = demo_dirs
    srv = ServeProcess("--model", str(qwen), "--whisper", str(whisper), "--dtype", "fp32", "--served-model-name", NAME,
                       "--max-batch", "1", "--max-queue", "1", "--transcribe-max-tokens", "3000")
    try:
        body, ctype = form(GOOD, ("a.wav", wav(20.0, 1), "audio/wav"))
        sock = connect(srv)
        sock.sendall(f"POST {TRANSCRIBE} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        until(lambda: metric(srv, "qva_running_requests") == 1, 30, "the upload's window never ran")
        sock.close()  # the client leaves mid-answer
        until(lambda: metric(srv, "qva_running_requests") == 0, 5, "the row was not freed")
        until(lambda: metric(srv, f'qva_http_requests_total{{route="{TRANSCRIBE}",status="499"}}') == 1, 5, "not counted as gone")
        assert metric(srv, "qva_generation_tokens_total") < 2000
        held = []
        for _ in range(2):  # one streams in the row, then one waits in the queue (in that order: sent together they race)
            c = HTTPConnection("127.0.0.1", srv.port, timeout=30)
            chat = {"model": NAME, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 3000, "temperature": 0, "stream": True}
            c.request("POST", "/v1/chat/completions", json.dumps(chat), {"Content-Type": "application/json"})
            held.append(c)
            if len(held) == 1:
                held[0].getresponse().fp.readline()
        until(lambda: metric(srv, "qva_queue_depth") == 1, 20, "the second chat did not queue")
        status, raw = post_form(srv, TRANSCRIBE, body, ctype)
        assert status == 429 and json.loads(raw)["error"]["code"] == "queue_full"
        for c in held:
            c.sock.shutdown(2)
            c.close()
        until(lambda: metric(srv, "qva_running_requests") + metric(srv, "qva_queue_depth") == 0, 10, "chats still held")
        assert http(srv.base + "/health")[0] == 200
    finally:
        srv.stop()
